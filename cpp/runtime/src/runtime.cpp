// Runtime: engine dir + SkipPolicy + the ORT graph, and the generation loop of adaskip/runtime/generate.py
// (Generator._run) for one request: the policy decides every mask, the loop only passes masks and stats along.
#include "adaskip/runtime.h"

#include <chrono>
#include <cmath>
#include <set>

#include <nlohmann/json.hpp>

#include "engine_dir.h"
#include "ort_graph.h"
#include "prompt.h"
#include "sampler.h"

namespace adaskip {

namespace detail {

CheckedPrompt check_prompt(const std::vector<int64_t>& ids, const SamplingOptions& options, int context_len,
                           int vocab_size) {
  const int budget = context_len - options.max_new_tokens;
  if (budget < 1) {
    throw InputError("max_new_tokens " + std::to_string(options.max_new_tokens) + " leaves no room for a prompt in "
                     "the model's context of " + std::to_string(context_len) + " tokens");
  }
  if (ids.empty()) throw InputError("prompt is empty");
  for (int64_t id : ids) {
    if (id < 0 || id >= vocab_size) {
      throw InputError("prompt has token ids outside the vocabulary (0.." + std::to_string(vocab_size - 1) + ")");
    }
  }
  const auto n = static_cast<int64_t>(ids.size());
  if (n <= budget) return {ids, false};
  if (options.truncate == Truncate::Middle) {
    const int head = budget / 2;
    CheckedPrompt out{std::vector<int64_t>(ids.begin(), ids.begin() + head), true};
    out.ids.insert(out.ids.end(), ids.end() - (budget - head), ids.end());
    return out;
  }
  throw InputError("prompt has " + std::to_string(n) + " tokens; with max_new_tokens " +
                   std::to_string(options.max_new_tokens) + " that exceeds the model's context of " +
                   std::to_string(context_len) + " tokens (shorten it, lower max_new_tokens, or truncate the middle)");
}

}  // namespace detail

void validate(const SamplingOptions& o) {
  if (o.max_new_tokens < 1) {
    throw InputError("max_new_tokens must be a positive integer; got " + std::to_string(o.max_new_tokens));
  }
  // as SamplingParams.validate: below 1e-3, logits / temperature overflows and the weights become NaN
  if (!(o.temperature == 0 || (o.temperature >= 1e-3 && o.temperature <= 100))) {
    throw InputError("temperature must be 0 (greedy) or between 0.001 and 100; got " + std::to_string(o.temperature));
  }
  if (o.top_k < 0) throw InputError("top_k must be >= 0; got " + std::to_string(o.top_k));
  if (!(o.top_p > 0 && o.top_p <= 1)) throw InputError("top_p must be in (0, 1]; got " + std::to_string(o.top_p));
}

double GenerationResult::decode_tokens_per_s() const {
  const double steps = tokens.empty() ? 0.0 : static_cast<double>(tokens.size() - 1);
  return decode_s > 0 ? steps / decode_s : 0.0;
}

namespace {
// With the decode kernels the engine dir's decode graph (the same weights, attention on cpp/ortops's op).
std::filesystem::path graph_file(const detail::EngineDir& dir, const std::filesystem::path& kernels) {
  if (kernels.empty()) return dir.graph_file;
  if (dir.decode_graph_file.empty()) {
    throw InputError(dir.root.string() + " has no graph for the decode kernels (built before adaskip-build wrote "
                     "one, or its KV cache is quantized): rebuild it, or run without the decode kernels");
  }
  return dir.decode_graph_file;
}
}  // namespace

struct Runtime::Impl {
  detail::EngineDir dir;
  SkipPolicy policy;
  detail::OrtGraph graph;

  Impl(detail::EngineDir d, const RuntimeOptions& options, const std::filesystem::path& kernels)
      : dir(std::move(d)),
        policy(dir.plan),
        graph(graph_file(dir, kernels), dir.model, dir.plan.num_sublayers(), options.threads, options.spinning,
              kernels) {
    dir.model.kv_layers = graph.kv_layers();
    if (graph.kv_layers() != policy.cached_layers() ||
        (!dir.manifest_kv_layers.empty() && dir.manifest_kv_layers != graph.kv_layers())) {
      throw EngineDirError(dir.root.string() + ": the graph holds KV for other layers than the plan's policy "
                           "caches: engine and plan do not belong together; rebuild the engine");
    }
  }
};

Runtime::Runtime(const std::filesystem::path& engine_dir, const RuntimeOptions& options) {
  const std::filesystem::path kernels = detail::decode_kernels_library(options.decode_kernels);
  auto dir = detail::open_engine_dir(engine_dir, options.verify_large_files);
  impl_ = std::make_unique<Impl>(std::move(dir), options, kernels);
}

Runtime::~Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;

const ModelInfo& Runtime::model() const { return impl_->dir.model; }
const SkipPolicy& Runtime::policy() const { return impl_->policy; }
const std::filesystem::path& Runtime::engine_dir() const { return impl_->dir.root; }

GenerationResult Runtime::generate(const std::vector<int64_t>& prompt, const SamplingOptions& options,
                                   const TokenCallback& on_token) const {
  using clock = std::chrono::steady_clock;
  validate(options);
  const ModelInfo& model = impl_->dir.model;
  const SkipPolicy& policy = impl_->policy;
  const detail::OrtGraph& graph = impl_->graph;
  detail::CheckedPrompt checked = detail::check_prompt(prompt, options, model.context_len, model.vocab_size);
  const std::vector<int64_t>& stops = options.stop_token_ids ? *options.stop_token_ids : model.eos_token_ids;
  const std::set<int64_t> stop_ids(stops.begin(), stops.end());
  detail::Sampler sampler(options);

  GenerationResult r;
  r.prompt_tokens = static_cast<int>(checked.ids.size());
  r.truncated_prompt = checked.truncated;
  RequestState state = policy.new_request();  // per request: nothing learned online carries over
  const int capacity = r.prompt_tokens + options.max_new_tokens;
  detail::KVCache cache = graph.new_cache(capacity);
  r.skips.kv_bytes = cache.nbytes();
  r.skips.kv_bytes_full = int64_t{2} * model.num_layers * model.num_kv_heads * model.head_dim * capacity *
                          static_cast<int64_t>(graph.kv_element_size());

  const auto t0 = clock::now();
  auto seconds = [&](clock::time_point t) { return std::chrono::duration<double>(t - t0).count(); };
  const Mask prefill = policy.prefill_mask(state);
  detail::StepOutput out = graph.prefill(checked.ids, cache, prefill, /*want_stats=*/false);  // learning is decode-only
  for (int step = 0;; ++step) {
    const int64_t tok = sampler.sample(std::move(out.logits));
    const auto now = clock::now();
    if (step == 0) {
      r.ttft_s = seconds(now);
      r.skips.prefill_skipped = prefill.skipped();
    } else {
      r.decode_s = seconds(now) - r.ttft_s;
    }
    if (stop_ids.count(tok)) {
      r.finish_reason = "stop";
      break;
    }
    r.tokens.push_back(tok);
    if (on_token && !on_token(tok)) {
      r.finish_reason = "cancelled";
      break;
    }
    if (static_cast<int>(r.tokens.size()) >= options.max_new_tokens) break;  // finish_reason stays "length"

    const Mask mask = policy.decode_mask(state);
    out = graph.decode(tok, cache, mask, policy.wants_decode_stats(state));
    policy.observe_decode(state, out.similarity, out.norm_ratio);
    r.skips.decode_skipped_offline.clear();
    for (int j : mask.skipped()) {
      if (!state.online.count(j)) r.skips.decode_skipped_offline.push_back(j);
    }
  }
  for (const auto& [j, scale] : state.online) r.skips.decode_skipped_online.push_back(j);
  r.skips.online_scales = state.online;
  r.skips.window_similarity = policy.window_means(state);
  r.skips.decode_steps = state.decode_steps;
  return r;
}

std::string to_json(const GenerationResult& r) {
  using json = nlohmann::ordered_json;  // the key order of the Python summary()
  auto by_index = [](const std::map<int, double>& m) {
    json o = json::object();
    for (const auto& [j, x] : m) o[std::to_string(j)] = x;
    return o;
  };
  auto rounded = [](double x, int digits) {
    const double f = std::pow(10.0, digits);
    return std::round(x * f) / f;
  };
  json j = {
      {"prompt_tokens", r.prompt_tokens},
      {"new_tokens", r.tokens.size()},
      {"tokens", r.tokens},
      {"finish_reason", r.finish_reason},
      {"ttft_s", rounded(r.ttft_s, 4)},
      {"decode_tokens_per_s", rounded(r.decode_tokens_per_s(), 2)},
      {"decode_s", rounded(r.decode_s, 6)},  // not in Python's summary: exact timing for benchmarks
      {"prefill_skipped", r.skips.prefill_skipped},
      {"decode_skipped_offline", r.skips.decode_skipped_offline},
      {"decode_skipped_online", r.skips.decode_skipped_online},
      {"online_scales", by_index(r.skips.online_scales)},
      {"window_similarity", by_index(r.skips.window_similarity)},
      {"decode_steps", r.skips.decode_steps},
      {"kv_bytes", r.skips.kv_bytes},
      {"kv_bytes_saved", r.skips.kv_bytes_saved()},
      {"truncated_prompt", r.truncated_prompt},
  };
  return j.dump();
}

}  // namespace adaskip
