// ctest driver of the C++ runtime. Suites:
//   unit PLAN_JSON   plan parsing, SkipPolicy, sampler and prompt checks on the repo's K=8 SmolLM2 plan
//   policy_trace     SkipPolicy replays Python SkipPolicy traces (masks, scales, stats requests, online FFNs)
//   plan_errors      plans the Python SkipPlan refuses are refused here too; the valid ones load
//   generate         the real engine: tokens and skip statistics equal the Python runtime's
//   open_errors      engine dirs that must be refused with a clear message
//   detokenize       tokenizer.json decoding equals Python tokenizers' decode(skip_special_tokens=True)
// The last five read files that tests/test_cpp_runtime.py writes into $ADASKIP_RUNTIME_TEST_DATA; without it they
// exit 77, which ctest reports as "skipped" (never as passed).
#include <cmath>
#include <fstream>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "adaskip/runtime.h"
#include "adaskip/detokenizer.h"
#include "prompt.h"
#include "sampler.h"

using nlohmann::json;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAIL: " << what << '\n';
  }
}

template <class T>
std::string show(const std::vector<T>& v) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  return s.str() + ']';
}

template <class E, class F>
void expect_error(F&& f, const std::string& substring, const std::string& what) {
  try {
    f();
    check(false, what + ": no error raised (expected one containing '" + substring + "')");
  } catch (const E& e) {
    check(std::string(e.what()).find(substring) != std::string::npos,
          what + ": message '" + e.what() + "' lacks '" + substring + "'");
  } catch (const std::exception& e) {
    check(false, what + ": wrong error type: " + e.what());
  }
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  return json::parse(in);
}

std::string data_file(const char* name) {
  const char* dir = std::getenv("ADASKIP_RUNTIME_TEST_DATA");
  if (dir == nullptr || !*dir) {
    std::cout << "ADASKIP_RUNTIME_TEST_DATA is not set: run tests/test_cpp_runtime.py, which prepares it\n";
    std::exit(77);
  }
  return std::string(dir) + "/" + name;
}

std::vector<double> doubles(const json& v) {  // null stands for NaN (JSON has no NaN)
  std::vector<double> out;
  for (const auto& x : v) out.push_back(x.is_null() ? std::numeric_limits<double>::quiet_NaN() : x.get<double>());
  return out;
}

std::vector<bool> bools(const json& v) {
  std::vector<bool> out;
  for (const auto& x : v) out.push_back(x.get<bool>());
  return out;
}

// -- unit ----------------------------------------------------------------------------------------------------------

void unit_policy(const std::string& plan_path) {
  adaskip::SkipPlan plan = adaskip::SkipPlan::load(plan_path);
  check(plan.k == 8 && plan.mode == "e2e" && plan.num_layers == 30 && plan.window == 20 && plan.beta.has_value(),
        "the K=8 e2e plan loads with its fields");
  adaskip::SkipPolicy policy(plan);
  std::vector<int> offline(plan.skip);
  std::sort(offline.begin(), offline.end());
  auto state = policy.new_request();
  check(policy.prefill_mask(state).skipped() == offline, "e2e prefill skips the offline set");
  check(policy.decode_mask(state).skipped() == offline, "decode step 1 skips the offline set");
  std::vector<int> cached;
  for (int i = 0; i < 30; ++i) {
    if (std::find(offline.begin(), offline.end(), 2 * i) == offline.end()) cached.push_back(i);
  }
  check(policy.cached_layers() == cached, "cached layers are those whose attention is not offline-skipped");

  // online learning: FFN 25 just above beta, FFN 27 just below, over W steps
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int step = 1; step <= plan.window; ++step) {
    check(policy.wants_decode_stats(state), "stats are wanted while the window is open (step " +
                                                std::to_string(step) + ")");
    std::vector<double> sim(60, 0.5), ratio(60, 1.0);
    for (int j : offline) sim[j] = ratio[j] = nan;
    sim[25] = *plan.beta + 1e-6;
    ratio[25] = step % 2 ? 1.25 : 1.75;
    sim[27] = *plan.beta - 1e-6;
    policy.observe_decode(state, sim, ratio);
    check(state.online.empty() == (step < plan.window), "online FFNs are decided after exactly W steps");
  }
  check(state.online.size() == 1 && state.online.count(25) && state.online.at(25) == 1.5,
        "FFN 25 joins with its decode-mean norm ratio as scale");
  check(!policy.wants_decode_stats(state), "no stats wanted after the window");
  adaskip::Mask m = policy.decode_mask(state);
  check(m.skip[25] && m.scales[25] == 1.5 && !m.skip[27] && m.scales[27] == plan.scales[27],
        "decode mask after the window skips the online FFN with its learned scale");
  check(policy.new_request().online.empty(), "a new request starts from the plan alone");
  check(adaskip::skipdecode_layers_at(0, 30, 4) == std::vector<int>{1} &&
            adaskip::skipdecode_layers_at(1, 30, 4) == std::vector<int>{1} &&
            adaskip::skipdecode_layers_at(2, 30, 4) == std::vector<int>({1, 2}) &&
            adaskip::skipdecode_layers_at(2000, 30, 4) == std::vector<int>({1, 2, 3, 4}) &&
            adaskip::skipdecode_layers_at(5, 30, 0).empty(),
        "SkipDecode's growing layer set (step 0: an e2e prefill)");
}

void unit_plan_errors(const std::string& plan_path) {
  std::ifstream in(plan_path);
  const json good = json::parse(in);
  auto with = [&](const std::string& ptr, const json& value) {
    json d = good;
    d[json::json_pointer(ptr)] = value;
    return d.dump();
  };
  using adaskip::PlanError;
  using adaskip::SkipPlan;
  expect_error<PlanError>([&] { SkipPlan::from_json("{not json"); }, "not readable JSON", "broken JSON");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/format", "x")); }, "not an adaskip skip plan", "format");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/version", 3)); }, "version 3 is not supported", "version");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/compensation", json{{"rule", "norm-ratio"}, {"sublayers", json::object()}})); },
                          "a version 1 plan has no compensation", "compensation in a version 1 plan");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/mode", "fast")); }, "mode", "mode");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/skip/0", 60)); }, "outside 0..59", "skip range");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/skip/0", 52)); }, "non-unique", "duplicate skip");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/online/window", 0)); }, "online/window", "window");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/budget/k", 7)); }, "K=7", "budget");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/scales", json::array({1.0}))); }, "1 scales", "scales");
  expect_error<PlanError>([&] { SkipPlan::from_json(with("/online/beta", "high")); }, "online/beta", "beta type");
  expect_error<PlanError>([&] { SkipPlan::load("/nonexistent/plan.json"); }, "does not exist", "missing file");
  SkipPlan p = SkipPlan::from_json(good.dump());
  expect_error<PlanError>([&] { p.check_model("sha256:0000", 30); }, "rebuild it with adaskip-build", "fingerprint");
  expect_error<PlanError>([&] { p.check_model(p.fingerprint, 12); }, "30-layer", "layer count");
}

void unit_sampler_and_prompt() {
  using adaskip::detail::Sampler;
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f, 1.9f};
  check(adaskip::detail::argmax(logits) == 1, "greedy takes the first maximum");
  adaskip::SamplingOptions o;
  o.temperature = 0.9;
  o.top_k = 1;
  o.seed = 3;
  Sampler top1(o);
  for (int i = 0; i < 20; ++i) check(top1.sample({0.1f, 2.5f, 2.4f, 0.0f}) == 1, "top_k=1 is greedy");
  o.top_k = 0;
  o.top_p = 1e-9;
  Sampler nucleus(o);
  for (int i = 0; i < 20; ++i) check(nucleus.sample({0.1f, 2.4f, 2.5f, 0.0f}) == 2, "a tiny top_p is greedy");
  o.top_p = 0.9;
  o.seed = 11;
  Sampler a(o), b(o);
  std::vector<int64_t> sa, sb;
  std::vector<int> seen(4, 0);
  for (int i = 0; i < 400; ++i) {
    sa.push_back(a.sample({1.0f, 1.1f, 0.9f, -30.0f}));
    sb.push_back(b.sample({1.0f, 1.1f, 0.9f, -30.0f}));
    seen[sa.back()]++;
  }
  check(sa == sb, "the same seed draws the same tokens");
  check(seen[0] > 0 && seen[1] > 0 && seen[2] > 0 && seen[3] == 0,
        "sampling draws from the kept tokens only: " + show(seen));

  using adaskip::detail::check_prompt;
  adaskip::SamplingOptions s;
  s.max_new_tokens = 4;
  std::vector<int64_t> ids = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  check(check_prompt(ids, s, 16, 100).ids == ids, "a prompt that fits is kept");
  expect_error<adaskip::InputError>([&] { check_prompt(ids, s, 12, 100); }, "exceeds the model's context",
                                    "prompt over the context");
  expect_error<adaskip::InputError>([&] { check_prompt({}, s, 12, 100); }, "prompt is empty", "empty prompt");
  expect_error<adaskip::InputError>([&] { check_prompt({1, 100}, s, 12, 100); }, "outside the vocabulary",
                                    "token id out of range");
  s.truncate = adaskip::Truncate::Middle;
  auto cut = check_prompt(ids, s, 12, 100);
  check(cut.truncated && cut.ids == std::vector<int64_t>({1, 2, 3, 4, 7, 8, 9, 10}),
        "truncate middle keeps the beginning and the end: " + show(cut.ids));
  s.max_new_tokens = 12;
  expect_error<adaskip::InputError>([&] { check_prompt(ids, s, 12, 100); }, "leaves no room", "no room");
  adaskip::SamplingOptions bad;
  bad.top_p = 0;
  expect_error<adaskip::InputError>([&] { adaskip::validate(bad); }, "top_p", "top_p 0");
  bad = {};
  bad.temperature = -1;
  expect_error<adaskip::InputError>([&] { adaskip::validate(bad); }, "temperature", "negative temperature");
  bad = {};
  bad.max_new_tokens = 0;
  expect_error<adaskip::InputError>([&] { adaskip::validate(bad); }, "max_new_tokens", "max_new_tokens 0");
}

// -- suites on data prepared by the Python test ----------------------------------------------------------------------

void policy_trace() {
  const json traces = read_json(data_file("policy_traces.json"));
  check(!traces.empty(), "traces present");
  for (const auto& t : traces) {
    const std::string name = t["name"];
    adaskip::SkipPolicy policy(adaskip::SkipPlan::from_json(t["plan"].dump()));
    auto state = policy.new_request();
    const json& e = t["expect"];
    auto pm = policy.prefill_mask(state);
    check(pm.skip == bools(e["prefill"]["skip"]) && pm.scales == doubles(e["prefill"]["scales"]),
          name + ": prefill mask");
    check(policy.cached_layers() == e["cached_layers"].get<std::vector<int>>(), name + ": cached layers");
    check(policy.sublayer_roles() == e["roles"].get<std::vector<std::string>>(), name + ": sublayer roles");
    check(policy.learns_online() == e["learns_online"].get<bool>(), name + ": learns_online");
    for (size_t s = 0; s < t["steps"].size(); ++s) {
      const json& want = e["decode"][s];
      auto m = policy.decode_mask(state);
      const std::string at = name + " step " + std::to_string(s + 1);
      check(m.skip == bools(want["skip"]), at + ": skip mask " + show(m.skipped()));
      check(m.scales == doubles(want["scales"]), at + ": scales");
      check(policy.wants_decode_stats(state) == want["wants_stats"].get<bool>(), at + ": wants stats");
      policy.observe_decode(state, doubles(t["steps"][s]["similarity"]), doubles(t["steps"][s]["norm_ratio"]));
    }
    std::map<int, double> online;
    for (const auto& [k, v] : e["online"].items()) online[std::stoi(k)] = v.get<double>();
    check(state.online == online, name + ": online FFNs and scales");
    std::map<int, double> means;
    for (const auto& [k, v] : e["window_means"].items()) means[std::stoi(k)] = v.get<double>();
    check(policy.window_means(state) == means, name + ": window means");
    std::cout << name << ": " << t["steps"].size() << " steps, online " << e["online"].dump() << '\n';
  }
}

void plan_errors() {
  const json cases = read_json(data_file("plans.json"));
  for (const auto& c : cases) {
    const std::string name = c["name"], text = c["text"];
    if (c["valid"].get<bool>()) {
      try {
        adaskip::SkipPlan::from_json(text);
      } catch (const std::exception& e) {
        check(false, name + ": a plan Python accepts is refused: " + e.what());
      }
    } else {
      expect_error<adaskip::PlanError>([&] { adaskip::SkipPlan::from_json(text); }, "", name);
    }
  }
  std::cout << cases.size() << " plans checked\n";
}

adaskip::SamplingOptions options_from(const json& o) {
  adaskip::SamplingOptions s;
  s.max_new_tokens = o.value("max_new_tokens", 128);
  s.temperature = o.value("temperature", 0.0);
  s.top_k = o.value("top_k", 0);
  s.top_p = o.value("top_p", 1.0);
  if (o.contains("seed") && !o["seed"].is_null()) s.seed = o["seed"].get<uint64_t>();
  if (o.contains("stop_token_ids") && !o["stop_token_ids"].is_null()) {
    s.stop_token_ids = o["stop_token_ids"].get<std::vector<int64_t>>();
  }
  return s;
}

void generate() {
  const json spec = read_json(data_file("generate.json"));
  adaskip::Runtime rt(spec["engine"].get<std::string>());
  check(rt.model().num_layers == 30 && rt.model().vocab_size == 49152, "engine model info");
  for (const auto& c : spec["cases"]) {
    const std::string name = c["name"];
    const auto ids = c["ids"].get<std::vector<int64_t>>();
    const auto opts = options_from(c["options"]);
    if (c.contains("expect_error")) {
      expect_error<adaskip::InputError>([&] { rt.generate(ids, opts); }, c["expect_error"], name);
      continue;
    }
    std::vector<int64_t> streamed;
    const int cancel_after = c.value("cancel_after", 0);
    auto r = rt.generate(ids, opts, [&](int64_t tok) {
      streamed.push_back(tok);
      return cancel_after == 0 || static_cast<int>(streamed.size()) < cancel_after;
    });
    check(streamed == r.tokens, name + ": the callback saw every token");
    const json got = json::parse(adaskip::to_json(r));
    for (const auto& [key, want] : c["expect"].items()) {
      check(got[key] == want, name + ": " + key + " is " + got[key].dump() + ", the Python runtime's is " +
                                  want.dump());
    }
    if (c.value("repeat", false)) {
      check(rt.generate(ids, opts).tokens == r.tokens, name + ": a seeded rerun draws the same tokens");
    }
    std::cout << name << ": " << got.dump() << '\n';
  }
}

void open_errors() {
  const json cases = read_json(data_file("open_errors.json"));
  for (const auto& c : cases) {
    const std::string name = c["name"], want = c["expect_error"];
    expect_error<adaskip::EngineDirError>([&] { adaskip::Runtime rt(c["engine"].get<std::string>()); }, want, name);
    try {
      adaskip::Runtime rt(c["engine"].get<std::string>());
    } catch (const std::exception& e) {
      std::cout << name << ": " << e.what() << '\n';
    }
  }
}

void detokenize() {
  const json cases = read_json(data_file("detokenize.json"));
  for (const auto& tok : cases) {
    adaskip::Detokenizer d(tok["tokenizer"].get<std::string>());
    int n = 0;
    for (const auto& c : tok["cases"]) {
      std::vector<int64_t> ids = c["ids"].get<std::vector<int64_t>>();
      std::string got = d.decode(ids), want = c["text"];
      check(got == want, tok["tokenizer"].get<std::string>() + ": ids " + show(ids) + " decode to '" + got +
                             "', Python says '" + want + "'");
      ++n;
    }
    expect_error<adaskip::InputError>([&] { d.decode({-1}); }, "outside the tokenizer's vocabulary", "id -1");
    std::cout << tok["tokenizer"].get<std::string>() << ": " << n << " cases\n";
  }
  const std::string s = "ab\xE2\x96";  // the first two bytes of a three-byte character
  check(adaskip::complete_utf8_prefix(s) == 2, "half a character is held back");
  check(adaskip::complete_utf8_prefix("ab\xE2\x96\x81") == 5, "a whole character is not held back");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string suite = argc > 1 ? argv[1] : "";
  try {
    if (suite == "unit" && argc > 2) {
      unit_policy(argv[2]);
      unit_plan_errors(argv[2]);
      unit_sampler_and_prompt();
    } else if (suite == "policy_trace") {
      policy_trace();
    } else if (suite == "plan_errors") {
      plan_errors();
    } else if (suite == "generate") {
      generate();
    } else if (suite == "open_errors") {
      open_errors();
    } else if (suite == "detokenize") {
      detokenize();
    } else {
      std::cerr << "usage: adaskip_runtime_tests unit PLAN_JSON | policy_trace | plan_errors | generate | "
                   "open_errors | detokenize\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "FAIL: " << suite << ": unexpected error: " << e.what() << '\n';
    return 1;
  }
  std::cout << suite << ": " << (failures ? std::to_string(failures) + " failures" : "ok") << '\n';
  return failures ? 1 : 0;
}
