// SkipPolicy: which sublayers run at each step (port of adaskip/policy.py, the one skip rule every backend follows).
//
// Per request: the prefill forward skips the offline set in modes prefill and e2e (nothing in decode); decode step t
// (1-based) skips the offline set (SkipDecode in decode mode: its set at step t) plus, once the first W steps are
// done, the request's online FFNs. Online learning (modes decode/e2e): during decode steps 1..W record IO similarity
// and norm ratio of every FFN that ran; after step W each FFN outside the offline set whose mean similarity >= beta
// joins the request's skip set with its mean norm ratio as scale. State lives in a RequestState per request.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "adaskip/plan.h"

namespace adaskip {

struct RequestState {
  int decode_steps = 0;           // decode forwards completed
  std::map<int, double> sim_sum;  // FFN j -> sum of decode similarities in the window
  std::map<int, double> ratio_sum;
  std::map<int, int> count;
  std::map<int, double> online;   // FFN j -> scale, decided after the window
  bool learned = false;
};

struct Mask {
  std::vector<bool> skip;      // per sublayer
  std::vector<double> scales;  // per sublayer, used where skip is true
  std::vector<int> skipped() const;
};

class SkipPolicy {
 public:
  explicit SkipPolicy(SkipPlan plan);

  const SkipPlan& plan() const { return plan_; }
  int num_sublayers() const { return n_; }
  RequestState new_request() const { return {}; }
  bool learns_online() const;

  Mask prefill_mask(const RequestState& state) const;
  Mask decode_mask(const RequestState& state) const;  // the mask of step state.decode_steps + 1
  // Layers whose attention runs in some decode step: only they get a KV cache.
  std::vector<int> cached_layers() const;
  // Per sublayer: "never" (removable), "always" (no conditional) or "dynamic".
  std::vector<std::string> sublayer_roles() const;
  // Whether the next decode step's similarity stats will be used (only while the window is open).
  bool wants_decode_stats(const RequestState& state) const;
  // Record one finished decode step's stats (NaN = sublayer did not run); sizes must be 2L.
  void observe_decode(RequestState& state, const std::vector<double>& similarity,
                      const std::vector<double>& norm_ratio) const;
  std::map<int, double> window_means(const RequestState& state) const;

 private:
  std::set<int> decode_offline(int step) const;
  std::set<int> skipdecode_set(int step) const;
  Mask make_mask(const std::set<int>& offline, const std::map<int, double>& online) const;

  SkipPlan plan_;
  int n_;
  std::set<int> offline_;
  bool growing_;
};

}  // namespace adaskip
