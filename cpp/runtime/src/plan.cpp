// SkipPlan parsing and validation: the JSON schema and invariants of adaskip/plan.py, checked in the same terms.
#include "adaskip/plan.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "adaskip/errors.h"
#include "json_util.h"

namespace adaskip {
namespace {

using detail::json;

[[noreturn]] void invalid(const std::string& path, const std::string& what) {
  detail::fail_at<PlanError>("invalid skip plan", path, what);
}

const json& field(const json& obj, const std::string& path, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end()) invalid(path, std::string("'") + key + "' is a required property");
  return *it;
}

const json& object_field(const json& obj, const std::string& path, const char* key) {
  const json& v = field(obj, path, key);
  if (!v.is_object()) invalid(detail::join_path(path, key), "is not of type 'object'");
  return v;
}

// Every integer a plan holds ends up in an int: anything beyond INT_MAX is refused, never truncated (a window of
// 2^32 used to become 0).
long long int_field(const json& obj, const std::string& path, const char* key, long long minimum,
                    long long maximum = INT_MAX) {
  const json& v = field(obj, path, key);
  std::string where = detail::join_path(path, key);
  long long x = 0;
  if (!detail::is_integer(v)) invalid(where, detail::brief(v) + " is not of type 'integer'");
  if (!detail::as_int64(v, x) || x > maximum) {
    invalid(where, detail::brief(v) + " is greater than the maximum of " + std::to_string(maximum));
  }
  if (x < minimum) invalid(where, std::to_string(x) + " is less than the minimum of " + std::to_string(minimum));
  return x;
}

std::string string_field(const json& obj, const std::string& path, const char* key) {
  const json& v = field(obj, path, key);
  if (!v.is_string()) invalid(detail::join_path(path, key), "is not of type 'string'");
  return v.get<std::string>();
}

std::string enum_field(const json& obj, const std::string& path, const char* key,
                       const std::vector<std::string>& allowed) {
  const json& v = field(obj, path, key);
  if (!v.is_string() || std::find(allowed.begin(), allowed.end(), v.get<std::string>()) == allowed.end()) {
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    invalid(detail::join_path(path, key), detail::brief(v) + " is not one of " + list);
  }
  return v.get<std::string>();
}

std::vector<double> number_array(const json& obj, const std::string& path, const char* key) {
  const json& v = field(obj, path, key);
  std::string where = detail::join_path(path, key);
  if (!v.is_array()) invalid(where, "is not of type 'array'");
  std::vector<double> out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_number()) invalid(where + "/" + std::to_string(i), detail::brief(v[i]) + " is not of type 'number'");
    out.push_back(v[i].get<double>());
  }
  return out;
}

Calibration parse_calibration(const json& c) {
  static const std::set<std::string> keys = {"similarity", "norm_ratio", "num_prompts", "prompt_tokens",
                                             "data_digest", "source"};
  for (const auto& item : c.items()) {
    if (!keys.count(item.key())) invalid("calibration", "additional property '" + item.key() + "' is not allowed");
  }
  Calibration cal;
  cal.similarity = number_array(c, "calibration", "similarity");
  cal.norm_ratio = number_array(c, "calibration", "norm_ratio");
  cal.num_prompts = int_field(c, "calibration", "num_prompts", 1);
  cal.prompt_tokens = int_field(c, "calibration", "prompt_tokens", 1);
  cal.data_digest = string_field(c, "calibration", "data_digest");
  cal.source = string_field(c, "calibration", "source");
  return cal;
}

Compensation parse_compensation(const json& c) {
  if (!c.is_object()) invalid("compensation", "is not of type 'object', 'null'");
  for (const auto& item : c.items()) {
    if (item.key() != "rule" && item.key() != "sublayers") {
      invalid("compensation", "additional property '" + item.key() + "' is not allowed");
    }
  }
  Compensation comp;
  std::vector<std::string> rules(std::begin(kCompensationRules), std::end(kCompensationRules));
  comp.rule = enum_field(c, "compensation", "rule", rules);
  const json& subs = object_field(c, "compensation", "sublayers");
  for (const auto& item : subs.items()) {
    const std::string& key = item.key();
    const std::string where = "compensation/sublayers/" + key;
    if (key.empty() || key.size() > 9 || !std::all_of(key.begin(), key.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
      invalid("compensation/sublayers", "additional property '" + key + "' is not allowed");
    }
    if (!item.value().is_object()) invalid(where, "is not of type 'object'");
    for (const auto& f : item.value().items()) {
      if (f.key() != "scale" && f.key() != "shift") invalid(where, "additional property '" + f.key() + "' is not allowed");
    }
    comp.sublayers[std::stoi(key)] = {number_array(item.value(), where, "scale"),
                                      number_array(item.value(), where, "shift")};
  }
  return comp;
}

SkipPlan parse(const json& d) {
  if (!d.is_object() || !d.contains("format") || d["format"] != kPlanFormat) {
    throw PlanError(std::string("not an adaskip skip plan (expected format '") + kPlanFormat + "')");
  }
  const json version = d.value("version", json());
  std::string readable;
  bool known = false;
  for (int v : kPlanVersions) {
    readable += (readable.empty() ? "" : ", ") + std::to_string(v);
    known = known || (version.is_number() && version == v);
  }
  if (!known) {
    throw PlanError("skip plan version " + (version.is_null() ? std::string("None") : detail::brief(version)) +
                    " is not supported (this adaskip reads " + readable + "); rebuild the plan with adaskip-build");
  }
  const bool has_compensation = d.contains("compensation") && !d["compensation"].is_null();
  if (version == 1 && has_compensation) {
    throw PlanError("invalid skip plan: a version 1 plan has no compensation (version 2 adds it)");
  }
  SkipPlan p;
  p.version = version.get<int>();
  p.method = enum_field(d, "", "method", {"adaskip", "early-exit", "skipdecode", "unified"});
  p.mode = enum_field(d, "", "mode", {"prefill", "decode", "e2e"});
  p.num_layers = static_cast<int>(int_field(d, "", "num_layers", 1, INT_MAX / 2));  // 2 * num_layers sublayers

  const json& budget = object_field(d, "", "budget");
  p.budget_unit = enum_field(budget, "budget", "unit", {"sublayers", "layers"});
  p.k = static_cast<int>(int_field(budget, "budget", "k", 0));

  const json& skip = field(d, "", "skip");
  if (!skip.is_array()) invalid("skip", "is not of type 'array'");
  for (size_t i = 0; i < skip.size(); ++i) {
    std::string where = "skip/" + std::to_string(i);
    long long j = 0;
    if (!detail::is_integer(skip[i])) invalid(where, detail::brief(skip[i]) + " is not of type 'integer'");
    if (!detail::as_int64(skip[i], j)) j = LLONG_MAX;  // out of range: reported below with the other bad ones
    if (j < 0) invalid(where, std::to_string(j) + " is less than the minimum of 0");
    if (std::find(p.skip.begin(), p.skip.end(), j) != p.skip.end()) invalid("skip", "has non-unique elements");
    p.skip.push_back(j > 1 << 30 ? 1 << 30 : static_cast<int>(j));  // out of range either way: reported below
  }
  p.scales = number_array(d, "", "scales");

  const json& online = object_field(d, "", "online");
  const json& enabled = field(online, "online", "enabled");
  if (!enabled.is_boolean()) invalid("online/enabled", detail::brief(enabled) + " is not of type 'boolean'");
  p.online_enabled = enabled.get<bool>();
  p.window = static_cast<int>(int_field(online, "online", "window", 1));
  const json& beta = field(online, "online", "beta");
  if (beta.is_number()) {
    p.beta = beta.get<double>();
  } else if (!beta.is_null()) {
    invalid("online/beta", detail::brief(beta) + " is not of type 'number', 'null'");
  }

  if (d.contains("calibration") && !d["calibration"].is_null()) {
    if (!d["calibration"].is_object()) invalid("calibration", "is not of type 'object', 'null'");
    p.calibration = parse_calibration(d["calibration"]);
  }
  if (has_compensation) p.compensation = parse_compensation(d["compensation"]);
  if (d.contains("selection") && !d["selection"].is_object()) invalid("selection", "is not of type 'object'");
  const json& model = object_field(d, "", "model");
  p.fingerprint = string_field(model, "model", "fingerprint");
  if (model.contains("name")) p.model_name = string_field(model, "model", "name");
  object_field(d, "", "tool");

  // invariants beyond the schema (SkipPlan.__post_init__)
  int n = p.num_sublayers();
  if (static_cast<int>(p.scales.size()) != n) {
    throw PlanError("plan has " + std::to_string(p.scales.size()) + " scales for " + std::to_string(n) +
                    " sublayers");
  }
  std::vector<int> bad;
  for (int j : p.skip) {
    if (j >= n) bad.push_back(j);
  }
  if (!bad.empty()) {
    std::string list;
    for (int j : bad) list += (list.empty() ? "" : ", ") + std::to_string(j);
    throw PlanError("skip set names sublayers [" + list + "] outside 0.." + std::to_string(n - 1));
  }
  if (!std::all_of(p.scales.begin(), p.scales.end(), [](double s) { return std::isfinite(s); })) {
    throw PlanError("plan scales must be finite numbers");
  }
  if (p.calibration && (static_cast<int>(p.calibration->similarity.size()) != n ||
                        static_cast<int>(p.calibration->norm_ratio.size()) != n)) {
    throw PlanError("plan calibration has " + std::to_string(p.calibration->similarity.size()) +
                    " similarities / " + std::to_string(p.calibration->norm_ratio.size()) + " norm ratios for " +
                    std::to_string(n) + " sublayers");
  }
  if (p.compensation) {
    for (const auto& [j, v] : p.compensation->sublayers) {
      const auto& [a, b] = v;
      if (std::find(p.skip.begin(), p.skip.end(), j) == p.skip.end() || a.size() != b.size() || a.empty()) {
        throw PlanError("compensation for sublayer " + std::to_string(j) + " must match the offline skip set and "
                        "have equal, non-empty scale and shift vectors");
      }
      auto finite = [](double x) { return std::isfinite(x); };
      if (!std::all_of(a.begin(), a.end(), finite) || !std::all_of(b.begin(), b.end(), finite)) {
        throw PlanError("compensation for sublayer " + std::to_string(j) + " has non-finite values");
      }
    }
  }
  if (p.budget_unit == "sublayers" && static_cast<int>(p.skip.size()) != p.k) {
    throw PlanError("plan budget says K=" + std::to_string(p.k) + " sublayers but the skip set has " +
                    std::to_string(p.skip.size()));
  }
  return p;
}

// nlohmann's own errors (a type_error on some shape the checks above missed) are a bad plan, not an internal error.
SkipPlan parse_checked(const json& d) {
  try {
    return parse(d);
  } catch (const json::exception& e) {
    throw PlanError(std::string("invalid skip plan: ") + e.what());
  }
}

}  // namespace

SkipPlan SkipPlan::from_json(const std::string& text) {
  json d;
  try {
    d = detail::parse_bounded<PlanError>(text, "skip plan");
  } catch (const json::parse_error& e) {
    throw PlanError(std::string("skip plan is not readable JSON: ") + e.what());
  }
  return parse_checked(d);
}

SkipPlan SkipPlan::load(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw PlanError("skip plan " + path.string() + (std::filesystem::exists(path) ? " is not readable" : " does not exist"));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  json d;
  try {
    d = detail::parse_bounded<PlanError>(buf.str(), "skip plan " + path.string());
  } catch (const json::parse_error& e) {
    throw PlanError("skip plan " + path.string() + " is not readable JSON: " + e.what());
  }
  return parse_checked(d);
}

void SkipPlan::check_model(const std::string& model_fingerprint, int model_num_layers) const {
  if (model_num_layers != num_layers) {
    throw PlanError("plan is for a " + std::to_string(num_layers) + "-layer model; this model has " +
                    std::to_string(model_num_layers) + " layers");
  }
  if (model_fingerprint != fingerprint) {
    throw PlanError("plan was built for model " + fingerprint.substr(0, 19) + "... (" +
                    (model_name.empty() ? std::string("unnamed") : model_name) + "), not this one (" +
                    model_fingerprint.substr(0, 19) + "...); rebuild it with adaskip-build");
  }
}

std::vector<int> skipdecode_layers_at(int step, int num_layers, int k) {
  if (k == 0) return {};
  // same arithmetic as the Python: ceil(counter / 512 * (k - 1)) in doubles, counter = decode forwards before
  double counter = static_cast<double>(std::max(step - 1, 0));
  double grown = std::ceil(counter / 512.0 * static_cast<double>(k - 1));
  long long limit = std::min<long long>(k, static_cast<long long>(grown) + 1);
  std::vector<int> layers;
  for (int i = 1; i < num_layers; ++i) {
    if (i <= limit) layers.push_back(i);
  }
  return layers;
}

}  // namespace adaskip
