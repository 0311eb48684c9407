// Small typed accessors over nlohmann::json that raise adaskip errors naming the offending path.
#pragma once

#include <cmath>
#include <string>

#include <nlohmann/json.hpp>

namespace adaskip::detail {

using json = nlohmann::json;

// Throws E("<prefix> at <path>: <what>").
template <class E>
[[noreturn]] void fail_at(const std::string& prefix, const std::string& path, const std::string& what) {
  throw E(prefix + " at " + (path.empty() ? "(top level)" : path) + ": " + what);
}

inline bool is_integer(const json& v) {
  if (v.is_number_integer()) return true;
  // JSON Schema's "integer" also accepts 3.0
  return v.is_number_float() && std::isfinite(v.get<double>()) && v.get<double>() == std::floor(v.get<double>());
}

inline std::string join_path(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "/" + key;
}

}  // namespace adaskip::detail
