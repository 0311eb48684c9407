// adaskip C++ runtime: open an engine directory written by `adaskip-build` (ONNX Runtime backend, "ort" graph
// variant) and generate from token ids with the same adaptive sublayer skipping as the Python runtime.
//
//   adaskip::Runtime rt("engines/smollm2-k8");
//   adaskip::SamplingOptions opts;
//   opts.max_new_tokens = 64;
//   auto result = rt.generate({1, 504, 3}, opts, [](int64_t token) { std::cout << token << '\n'; return true; });
//   std::cout << adaskip::to_json(result) << '\n';   // tokens + the skip statistics
//
// One request at a time per generate() call (batch 1); each call owns its KV cache and policy state, so concurrent
// generate() calls on one Runtime are safe. Tokenization is the caller's job (the engine dir's tokenizer/ folder
// holds Hugging Face tokenizer files). Errors: adaskip::EngineDirError, PlanError, InputError (see errors.h).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "adaskip/errors.h"
#include "adaskip/plan.h"
#include "adaskip/policy.h"

namespace adaskip {

inline constexpr const char* kEngineFormat = "adaskip.engine";
inline constexpr int kEngineVersion = 1;
inline constexpr int kGraphInterface = 1;  // adaskip/runtime/engine.py GRAPH_INTERFACE this runtime speaks

enum class Truncate { Error, Middle };  // a prompt over the context: fail, or keep its beginning and end

struct SamplingOptions {
  int max_new_tokens = 128;
  double temperature = 0.0;  // 0: greedy
  int top_k = 0;             // 0: off
  double top_p = 1.0;        // 1: off
  std::optional<uint64_t> seed;  // none: nondeterministic sampling
  std::optional<std::vector<int64_t>> stop_token_ids;  // none: the engine's end-of-sequence tokens
  Truncate truncate = Truncate::Error;
};

// The skip statistics the Python Generator reports (GenerationResult.summary), plus what online learning decided.
struct SkipStats {
  std::vector<int> prefill_skipped;         // sublayers skipped in the prefill forward
  std::vector<int> decode_skipped_offline;  // offline-set sublayers skipped at the last decode step
  std::vector<int> decode_skipped_online;   // FFNs this request added online (fired after the window)
  std::map<int, double> online_scales;      // online FFN -> its decode-mean norm ratio (the scale it got)
  std::map<int, double> window_similarity;  // FFN -> its mean decode similarity over the window
  int decode_steps = 0;                     // decode forwards run
  int64_t kv_bytes = 0;                     // KV cache allocated for this request
  int64_t kv_bytes_full = 0;                // what a model skipping nothing would allocate
  int64_t kv_bytes_saved() const { return kv_bytes_full - kv_bytes; }
};

struct GenerationResult {
  int prompt_tokens = 0;
  std::vector<int64_t> tokens;           // new tokens (a stop token is not included)
  std::string finish_reason = "length";  // "stop" | "length" | "cancelled" (the callback returned false)
  bool truncated_prompt = false;
  double ttft_s = 0.0;
  double decode_s = 0.0;
  SkipStats skips;
  double decode_tokens_per_s() const;
};

// Called with each new token as it is produced; return false to stop generating (finish_reason "cancelled").
using TokenCallback = std::function<bool(int64_t token)>;

struct ModelInfo {
  std::string name;
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  int context_len = 0;            // max_position_embeddings
  std::vector<int> kv_layers;     // layers the graph keeps a KV cache for
  std::vector<int64_t> eos_token_ids;
};

struct RuntimeOptions {
  int threads = 0;                  // ONNX Runtime intra-op threads; 0: $ADASKIP_THREADS, else all cores
  int spinning = -1;                // intra-op threads spin between kernels: 1 yes, 0 no, -1: $ADASKIP_SPINNING
                                    // (0 or 1), else no (spinning speeds decode up only on cores of its own)
  bool verify_large_files = false;  // also hash files over 64 MB (as adaskip-verify does); sizes are always checked
  // cpp/ortops's library (libadaskip_ortops.so): decode steps run their attention on its kernel, through the graph
  // with its op that adaskip-build writes into the engine dir. None: $ADASKIP_DECODE_KERNELS; empty (either way):
  // ONNX Runtime's kernels only.
  std::optional<std::filesystem::path> decode_kernels;
};

class Runtime {
 public:
  // Reads and verifies the engine dir (manifest, file sizes and digests, plan vs model, graph interface and
  // variant) and loads the graph into ONNX Runtime. Throws EngineDirError or PlanError.
  explicit Runtime(const std::filesystem::path& engine_dir, const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;

  // Generates from prompt token ids. Throws InputError for a request that cannot be served as given.
  GenerationResult generate(const std::vector<int64_t>& prompt, const SamplingOptions& options = {},
                            const TokenCallback& on_token = {}) const;

  const ModelInfo& model() const;
  const SkipPolicy& policy() const;
  const std::filesystem::path& engine_dir() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Validates sampling options like SamplingParams.validate; throws InputError.
void validate(const SamplingOptions& options);

// The result as one JSON object: the keys of the Python GenerationResult.summary() plus "tokens", "decode_steps",
// "online_scales" and "window_similarity" (FFN index as a string key).
std::string to_json(const GenerationResult& result);

}  // namespace adaskip
