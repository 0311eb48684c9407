// The exported "ort" graph variant on ONNX Runtime's C++ API: the graph interface adaskip/runtime/ort_engines.py's
// OrtGqaEngine drives, for one request row. The KV cache is a BNSH buffer of the request's capacity per cached
// layer, bound as both past_key_i and present_key_i: GroupQueryAttention appends the new tokens in place, so no
// step copies the cache.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "adaskip/policy.h"
#include "adaskip/runtime.h"

namespace adaskip::detail {

struct KVCache {
  int capacity = 0;
  int length = 0;  // tokens written so far
  // layer -> [1, kv_heads, capacity, head_dim] in the graph's cache type (float32, or float16 / int8 from
  // adaskip-build --kv-dtype), as raw bytes: only the kernel reads them
  std::map<int, std::vector<uint8_t>> k, v;
  int element_type = 0;  // ONNXTensorElementDataType of the buffers
  int64_t nbytes() const;
};

struct StepOutput {
  std::vector<float> logits;       // [vocab]
  std::vector<double> similarity;  // [2L], NaN where skipped or not computed
  std::vector<double> norm_ratio;  // [2L]
};

// The decode kernels' library to load: `option` where given, else $ADASKIP_DECODE_KERNELS; empty for none. Throws
// InputError when it names something that is not a file.
std::filesystem::path decode_kernels_library(const std::optional<std::filesystem::path>& option);

class OrtGraph {
 public:
  // Loads the graph and checks that its inputs/outputs are the "ort" interface for this model. `kernels`: a custom-op
  // library the graph's nodes need (cpp/ortops, for an engine dir's decode graph), or empty.
  OrtGraph(const std::filesystem::path& model_file, const ModelInfo& model, int num_sublayers, int threads,
           int spinning, const std::filesystem::path& kernels = {});
  ~OrtGraph();

  const std::vector<int>& kv_layers() const { return kv_layers_; }
  size_t kv_element_size() const { return kv_element_size_; }  // bytes per cached K/V element
  KVCache new_cache(int capacity) const;
  StepOutput prefill(const std::vector<int64_t>& ids, KVCache& cache, const Mask& mask, bool want_stats) const;
  StepOutput decode(int64_t token, KVCache& cache, const Mask& mask, bool want_stats) const;

 private:
  StepOutput run(const std::vector<int64_t>& ids, KVCache& cache, const Mask& mask, bool want_stats) const;

  struct Session;
  std::unique_ptr<Session> session_;
  ModelInfo model_;
  int n_;
  std::vector<int> kv_layers_;
  int kv_type_ = 0;             // ONNXTensorElementDataType of the past_/present_ buffers
  size_t kv_element_size_ = 4;  // its bytes per element
};

// The intra-op thread count: `threads` if > 0, else $ADASKIP_THREADS, else 0 (ONNX Runtime: all cores).
int thread_count(int threads);
// Whether intra-op threads spin: `spinning` if 0 or 1, else $ADASKIP_SPINNING (0 or 1), else no.
bool spinning_enabled(int spinning);

}  // namespace adaskip::detail
