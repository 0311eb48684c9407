#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace adaskip::detail {

int64_t argmax(const std::vector<float>& logits) {
  // torch.argmax: the first maximal value; NaN counts as the maximum
  int64_t best = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i])) return static_cast<int64_t>(i);
    if (logits[i] > logits[best]) best = static_cast<int64_t>(i);
  }
  return best;
}

Sampler::Sampler(const SamplingOptions& options)
    : options_(options), rng_(options.seed ? *options.seed : std::random_device{}()) {}

int64_t Sampler::sample(std::vector<float> logits) {
  if (options_.temperature == 0.0) return argmax(logits);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float temperature = static_cast<float>(options_.temperature);
  for (float& x : logits) x /= temperature;
  const size_t v = logits.size();
  if (options_.top_k > 0) {
    size_t k = std::min(static_cast<size_t>(options_.top_k), v);
    std::vector<float> top(logits);
    std::nth_element(top.begin(), top.begin() + (k - 1), top.end(), std::greater<float>());
    const float kth = top[k - 1];
    for (float& x : logits) {
      if (x < kth) x = neg_inf;
    }
  }
  if (options_.top_p < 1.0) {
    std::vector<size_t> order(v);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return logits[a] > logits[b]; });
    const double top = logits[order[0]];
    double z = 0.0;
    for (float x : logits) z += std::exp(static_cast<double>(x) - top);
    double cum = 0.0;
    for (size_t r = 0; r < v; ++r) {  // drop a token once the ones before it already reach top_p
      const double p = std::exp(static_cast<double>(logits[order[r]]) - top) / z;
      cum += p;
      if (cum - p >= options_.top_p) logits[order[r]] = neg_inf;
    }
  }
  const double top = *std::max_element(logits.begin(), logits.end());
  std::vector<double> weights(v);
  for (size_t i = 0; i < v; ++i) weights[i] = std::exp(static_cast<double>(logits[i]) - top);
  std::discrete_distribution<int64_t> draw(weights.begin(), weights.end());
  return draw(rng_);
}

}  // namespace adaskip::detail
