// Errors a user can act on, mirroring adaskip/errors.py: every message names what is wrong and what to do.
#pragma once

#include <stdexcept>
#include <string>

namespace adaskip {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A skip plan is malformed, of another format version, or does not match the model.
class PlanError : public Error {
 public:
  using Error::Error;
};

// An engine directory is missing, corrupt, or was built for something this runtime does not run.
class EngineDirError : public Error {
 public:
  using Error::Error;
};

// A request cannot be served as given (empty prompt, over the context limit, bad sampling option).
class InputError : public Error {
 public:
  using Error::Error;
};

}  // namespace adaskip
