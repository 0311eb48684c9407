// SkipPlan: the plan.json every adaskip stage passes on (port of adaskip/plan.py, format "adaskip.skip-plan",
// versions 1 and 2; version 2 adds the per-channel compensation of skipped offline sublayers).
// Sublayer j: j = 2i is the attention of layer i, j = 2i + 1 its FFN.
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace adaskip {

inline constexpr const char* kPlanFormat = "adaskip.skip-plan";
inline constexpr int kPlanVersions[] = {1, 2};  // what this runtime reads (adaskip/plan.py PLAN_VERSIONS)
inline constexpr const char* kCompensationRules[] = {"norm-ratio", "token-ratio", "channel-scale", "channel-affine"};

struct Calibration {
  std::vector<double> similarity;  // per sublayer, mean prefill IO similarity over the calibration prompts
  std::vector<double> norm_ratio;  // per sublayer, mean ||h'|| / ||h||
  long long num_prompts = 0;
  long long prompt_tokens = 0;
  std::string data_digest;
  std::string source;
};

// What a skipped offline sublayer j outputs when the plan has a compensation for it: h' = scale_j * h + shift_j
// per channel. The graph applies it (it is data of the plan, not a decision): the policy and this runtime only
// carry it along.
struct Compensation {
  std::string rule;
  std::map<int, std::pair<std::vector<double>, std::vector<double>>> sublayers;  // j -> (scale, shift)
};

struct SkipPlan {
  int version = 1;
  std::string method;       // adaskip | early-exit | skipdecode | unified
  std::string mode;         // prefill | decode | e2e
  int num_layers = 0;
  std::string budget_unit;  // "sublayers" (AdaSkip) or "layers" (baselines)
  int k = 0;
  std::vector<int> skip;       // offline skip set (skipdecode in decode mode: the full set it grows into)
  std::vector<double> scales;  // per sublayer: h' = scale * h when skipped
  bool online_enabled = false;
  int window = 20;
  std::optional<double> beta;  // online threshold: the K-th largest offline similarity
  std::string fingerprint;
  std::string model_name;
  std::optional<Calibration> calibration;
  std::optional<Compensation> compensation;  // none: the paper's rule (scalar scales)

  int num_sublayers() const { return 2 * num_layers; }

  // Parse and validate like SkipPlan.from_dict (schema + invariants); throws PlanError naming what is wrong.
  static SkipPlan from_json(const std::string& text);
  static SkipPlan load(const std::filesystem::path& path);

  // Refuse a plan calibrated for another model.
  void check_model(const std::string& model_fingerprint, int model_num_layers) const;
};

// SkipDecode: layers skipped in forward `step` of a request (0: its e2e prefill, t >= 1: decode step t), growing
// from layer 1 to layers 1..k (adaskip/plan.py skipdecode_layers_at).
std::vector<int> skipdecode_layers_at(int step, int num_layers, int k);

}  // namespace adaskip
