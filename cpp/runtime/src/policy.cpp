// SkipPolicy: line-for-line the rule of adaskip/policy.py (tests/test_cpp_runtime.py replays Python traces on it).
#include "adaskip/policy.h"

#include <cmath>

#include "adaskip/errors.h"

namespace adaskip {

std::vector<int> Mask::skipped() const {
  std::vector<int> out;
  for (size_t j = 0; j < skip.size(); ++j) {
    if (skip[j]) out.push_back(static_cast<int>(j));
  }
  return out;
}

SkipPolicy::SkipPolicy(SkipPlan plan)
    : plan_(std::move(plan)),
      n_(plan_.num_sublayers()),
      offline_(plan_.skip.begin(), plan_.skip.end()),
      growing_(plan_.method == "skipdecode" && (plan_.mode == "decode" || plan_.mode == "e2e")) {}

bool SkipPolicy::learns_online() const {
  return plan_.online_enabled && plan_.beta.has_value() && (plan_.mode == "decode" || plan_.mode == "e2e");
}

Mask SkipPolicy::prefill_mask(const RequestState&) const {
  static const std::set<int> none;
  if (plan_.mode == "decode") return make_mask(none, {});
  return make_mask(growing_ ? skipdecode_set(0) : offline_, {});  // SkipDecode e2e: its step-0 set (layer 1)
}

Mask SkipPolicy::decode_mask(const RequestState& state) const {
  return make_mask(decode_offline(state.decode_steps + 1), state.online);
}

std::set<int> SkipPolicy::decode_offline(int step) const {
  return growing_ ? skipdecode_set(step) : offline_;
}

std::set<int> SkipPolicy::skipdecode_set(int step) const {
  std::set<int> out;
  for (int i : skipdecode_layers_at(step, plan_.num_layers, plan_.k)) {
    out.insert(2 * i);
    out.insert(2 * i + 1);
  }
  return out;
}

Mask SkipPolicy::make_mask(const std::set<int>& offline, const std::map<int, double>& online) const {
  Mask m;
  m.scales = plan_.scales;
  for (const auto& [j, r] : online) m.scales[j] = r;
  m.skip.resize(n_);
  for (int j = 0; j < n_; ++j) m.skip[j] = offline.count(j) || online.count(j);
  return m;
}

std::vector<int> SkipPolicy::cached_layers() const {
  // decode-phase skip sets only grow (SkipDecode) or stay fixed: the complement of step 1's set
  std::set<int> at_1 = decode_offline(1);
  std::vector<int> layers;
  for (int i = 0; i < plan_.num_layers; ++i) {
    if (!at_1.count(2 * i)) layers.push_back(i);
  }
  return layers;
}

std::vector<std::string> SkipPolicy::sublayer_roles() const {
  std::vector<int> prefill_list = prefill_mask(new_request()).skipped();
  std::set<int> prefill(prefill_list.begin(), prefill_list.end());
  const std::set<int>& ever_in_decode = offline_;  // the decode-phase set only grows towards the full offline set
  std::set<int> first_decode = decode_offline(1);
  std::vector<std::string> roles;
  for (int j = 0; j < n_; ++j) {
    bool online = learns_online() && j % 2 == 1 && !offline_.count(j);
    if (prefill.count(j) && first_decode.count(j)) {
      roles.push_back("never");
    } else if (!prefill.count(j) && !ever_in_decode.count(j) && !online) {
      roles.push_back("always");
    } else {
      roles.push_back("dynamic");
    }
  }
  return roles;
}

bool SkipPolicy::wants_decode_stats(const RequestState& state) const {
  return learns_online() && !state.learned;
}

void SkipPolicy::observe_decode(RequestState& state, const std::vector<double>& similarity,
                                const std::vector<double>& norm_ratio) const {
  if (static_cast<int>(similarity.size()) != n_ || static_cast<int>(norm_ratio.size()) != n_) {
    throw Error("observe_decode needs " + std::to_string(n_) + " similarities and norm ratios");
  }
  state.decode_steps += 1;
  if (!learns_online() || state.learned) return;
  for (int j = 1; j < n_; j += 2) {  // FFNs only: attention decisions are offline only
    double s = similarity[j], r = norm_ratio[j];
    if (offline_.count(j) || std::isnan(s)) continue;
    state.sim_sum[j] += s;
    state.ratio_sum[j] += r;
    state.count[j] += 1;
  }
  if (state.decode_steps >= plan_.window) {
    const double beta = *plan_.beta;
    state.online.clear();
    for (const auto& [j, c] : state.count) {
      if (state.sim_sum[j] / c >= beta) state.online[j] = state.ratio_sum[j] / c;
    }
    state.learned = true;
  }
}

std::map<int, double> SkipPolicy::window_means(const RequestState& state) const {
  std::map<int, double> out;
  for (const auto& [j, c] : state.count) out[j] = state.sim_sum.at(j) / c;
  return out;
}

}  // namespace adaskip
