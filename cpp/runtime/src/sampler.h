// Next-token sampling with the semantics of Generator._sample: greedy (first maximum) at temperature 0, otherwise
// logits / temperature, top-k (ties with the k-th value kept), top-p (the smallest set reaching top_p), then a draw.
// The random stream is this runtime's own (std::mt19937_64 seeded by `seed`), not torch's: seeded sampling is
// reproducible here but draws other tokens than the Python runtime with the same seed.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "adaskip/runtime.h"

namespace adaskip::detail {

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options);
  int64_t sample(std::vector<float> logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
};

int64_t argmax(const std::vector<float>& logits);

}  // namespace adaskip::detail
