#include "ort_graph.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <set>

#include <onnxruntime_cxx_api.h>

#include "adaskip/errors.h"
#include "json_util.h"

namespace adaskip::detail {
namespace {

// The library must serve the C API version the headers were written for (it serves every older one too).
void init_ort_api() {
  static const bool ok = [] {
    const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (api != nullptr) Ort::InitApi(api);
    return api != nullptr;
  }();
  if (!ok) {
    throw EngineDirError(std::string("the ONNX Runtime library in use (") + OrtGetApiBase()->GetVersionString() +
                         ") is older than the headers this runtime was built with (C API " +
                         std::to_string(ORT_API_VERSION) + "); link a newer libonnxruntime");
  }
}

Ort::Env& env() {
  static Ort::Env e(ORT_LOGGING_LEVEL_ERROR, "adaskip");
  return e;
}

// The fixed part of the interface, in the order run() builds its values (the past_/present_ pairs follow).
const std::vector<std::string> kInputs = {"input_ids", "position_ids", "token_valid", "seqlens_k",
                                          "total_sequence_length", "last_index", "skip", "scale", "want_stats"};
const std::vector<std::string> kOutputs = {"logits", "similarity", "norm_ratio"};

}  // namespace

int64_t KVCache::nbytes() const {
  int64_t total = 0;
  for (const auto& [i, buf] : k) total += static_cast<int64_t>(buf.size());
  for (const auto& [i, buf] : v) total += static_cast<int64_t>(buf.size());
  return total;
}

namespace {
// An environment variable's value as an error message shows it: one line, at most 32 characters.
std::string shown(const std::string& value) {
  std::string out;
  for (unsigned char c : value.substr(0, 32)) out += std::isprint(c) ? static_cast<char>(c) : '?';
  return value.size() > 32 ? out + "..." : out;
}
}  // namespace

int thread_count(int threads) {
  if (threads > 0) return threads;
  const char* env_threads = std::getenv("ADASKIP_THREADS");
  std::string s = env_threads ? env_threads : "";
  if (s.empty()) return 0;
  if (!std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); }) || s.size() > 6) {
    throw InputError("ADASKIP_THREADS must be a number of threads; got '" + shown(s) + "'");
  }
  return std::stoi(s);
}

bool spinning_enabled(int spinning) {
  if (spinning == 0 || spinning == 1) return spinning == 1;
  const char* env_spinning = std::getenv("ADASKIP_SPINNING");
  const std::string s = env_spinning ? env_spinning : "";
  if (s.empty() || s == "0") return false;
  if (s == "1") return true;
  throw InputError("ADASKIP_SPINNING must be 0 (intra-op threads sleep when idle) or 1 (they spin); got '" + shown(s) +
                   "'");
}

struct OrtGraph::Session {
  Ort::Session session{nullptr};
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<std::string> input_names, output_names;  // in the order run() fills them
};

std::filesystem::path decode_kernels_library(const std::optional<std::filesystem::path>& option) {
  const char* env_value = std::getenv("ADASKIP_DECODE_KERNELS");
  const std::filesystem::path library = option ? *option : std::filesystem::path(env_value ? env_value : "");
  std::error_code ec;
  if (!library.empty() && !std::filesystem::is_regular_file(library, ec)) {
    throw InputError(std::string(option ? "decode_kernels" : "ADASKIP_DECODE_KERNELS") + " names '" +
                     shown(library.string()) + "', which is not a file; build it with `cmake --build build --target "
                     "adaskip_ortops` (build/lib/libadaskip_ortops.so)");
  }
  return library;
}

OrtGraph::OrtGraph(const std::filesystem::path& model_file, const ModelInfo& model, int num_sublayers, int threads,
                   int spinning, const std::filesystem::path& kernels)
    : model_(model), n_(num_sublayers) {
  init_ort_api();  // before any other ONNX Runtime call
  session_ = std::make_unique<Session>();
  Ort::SessionOptions so;
  so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  // the Python runtime's settings: off unless asked, since spinning threads double decode time when sessions share
  // the cores
  so.AddConfigEntry("session.intra_op.allow_spinning", spinning_enabled(spinning) ? "1" : "0");
  so.AddConfigEntry("session.inter_op.allow_spinning", "0");
  so.SetIntraOpNumThreads(thread_count(threads));
  so.SetLogSeverityLevel(3);
  if (!kernels.empty()) {
    try {
      so.RegisterCustomOpsLibrary(kernels.c_str());
    } catch (const Ort::Exception& e) {  // not a shared library, or not one built for this ONNX Runtime
      throw InputError("cannot load the decode kernels " + kernels.string() + ": " + e.what());
    }
  }
  try {
    session_->session = Ort::Session(env(), model_file.c_str(), so);
  } catch (const Ort::Exception& e) {
    throw EngineDirError("ONNX Runtime cannot load " + model_file.string() + ": " + e.what());
  }

  Ort::AllocatorWithDefaultOptions alloc;
  std::set<std::string> inputs, outputs;
  for (size_t i = 0; i < session_->session.GetInputCount(); ++i) {
    inputs.insert(session_->session.GetInputNameAllocated(i, alloc).get());
  }
  for (size_t i = 0; i < session_->session.GetOutputCount(); ++i) {
    outputs.insert(session_->session.GetOutputNameAllocated(i, alloc).get());
  }
  const std::string past_key = "past_key_";
  for (const auto& name : inputs) {
    const std::string digits = name.substr(0, past_key.size()) == past_key ? name.substr(past_key.size()) : "";
    if (!digits.empty() && digits.size() < 6 &&
        std::all_of(digits.begin(), digits.end(), [](unsigned char c) { return std::isdigit(c); })) {
      kv_layers_.push_back(std::stoi(digits));
    }
  }
  std::sort(kv_layers_.begin(), kv_layers_.end());

  // exactly the "ort" interface: anything else is another graph and would be run wrongly
  std::set<std::string> want_in(kInputs.begin(), kInputs.end()), want_out(kOutputs.begin(), kOutputs.end());
  for (int i : kv_layers_) {
    for (const char* kind : {"key", "value"}) {
      want_in.insert(std::string("past_") + kind + "_" + std::to_string(i));
      want_out.insert(std::string("present_") + kind + "_" + std::to_string(i));
    }
  }
  auto describe = [](const std::set<std::string>& a, const std::set<std::string>& b) {
    std::string s;
    for (const auto& x : a) {
      if (!b.count(x)) s += (s.empty() ? "" : ", ") + x;
    }
    return s.empty() ? std::string("none") : s;
  };
  if (inputs != want_in || outputs != want_out) {
    throw EngineDirError(model_file.string() + " does not have the graph interface of the 'ort' variant "
                         "(missing inputs: " + describe(want_in, inputs) + "; unexpected inputs: " +
                         describe(inputs, want_in) + "; missing outputs: " + describe(want_out, outputs) +
                         "; unexpected outputs: " + describe(outputs, want_out) + "); rebuild the engine");
  }
  auto dims = [&](const char* name, bool input) {
    for (size_t i = 0; i < (input ? inputs.size() : outputs.size()); ++i) {
      auto got = input ? session_->session.GetInputNameAllocated(i, alloc)
                       : session_->session.GetOutputNameAllocated(i, alloc);
      if (std::string(got.get()) == name) {
        auto info = input ? session_->session.GetInputTypeInfo(i) : session_->session.GetOutputTypeInfo(i);
        return info.GetTensorTypeAndShapeInfo().GetShape();
      }
    }
    return std::vector<int64_t>{};
  };
  auto skip_dims = dims("skip", true), logit_dims = dims("logits", false);
  bool shapes_ok = skip_dims.size() == 2 && skip_dims[1] == n_ && logit_dims.size() == 2 &&
                   logit_dims[1] == model_.vocab_size;
  for (int i : kv_layers_) {  // BNSH: [batch, kv_heads, capacity, head_dim]
    auto kv = dims(("past_key_" + std::to_string(i)).c_str(), true);
    shapes_ok = shapes_ok && kv.size() == 4 && kv[1] == model_.num_kv_heads && kv[3] == model_.head_dim;
  }
  // the cache type: one for every buffer, one the kernel keeps (float32, or --kv-dtype float16 / int8)
  const std::map<ONNXTensorElementDataType, size_t> kv_types = {{ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4},
                                                                {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2},
                                                                {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 1}};
  std::set<ONNXTensorElementDataType> seen;
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto name = session_->session.GetInputNameAllocated(i, alloc);
    if (std::string(name.get()).rfind("past_", 0) == 0) {
      seen.insert(session_->session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType());
    }
  }
  if (seen.size() > 1 || (seen.size() == 1 && !kv_types.count(*seen.begin()))) {
    throw EngineDirError(model_file.string() + ": its KV cache buffers are not all float32, float16 or int8 of one "
                         "type; the engine dir is inconsistent: rebuild it");
  }
  if (seen.size() == 1) {
    kv_type_ = *seen.begin();
    kv_element_size_ = kv_types.at(*seen.begin());
  } else {
    kv_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // no cached layer: nothing is allocated
  }
  if (!shapes_ok) {
    throw EngineDirError(model_file.string() + ": graph shapes do not match the manifest's model (" +
                         std::to_string(n_) + " sublayers, vocabulary " + std::to_string(model_.vocab_size) + ", " +
                         std::to_string(model_.num_kv_heads) + " KV heads of " + std::to_string(model_.head_dim) +
                         "); the engine dir is inconsistent: rebuild it");
  }

  session_->input_names = kInputs;
  session_->output_names = kOutputs;
  for (int i : kv_layers_) {
    for (const char* kind : {"key", "value"}) {
      session_->input_names.push_back(std::string("past_") + kind + "_" + std::to_string(i));
      session_->output_names.push_back(std::string("present_") + kind + "_" + std::to_string(i));
    }
  }
}

OrtGraph::~OrtGraph() = default;

KVCache OrtGraph::new_cache(int capacity) const {
  KVCache c;
  c.capacity = capacity;
  const auto size = static_cast<size_t>(checked_mul<InputError>(
      checked_mul<InputError>(model_.num_kv_heads, capacity, "KV cache size"), model_.head_dim, "KV cache size"));
  const auto bytes = static_cast<size_t>(
      checked_mul<InputError>(static_cast<int64_t>(size), static_cast<int64_t>(kv_element_size_), "KV cache size"));
  c.element_type = kv_type_;
  for (int i : kv_layers_) {
    c.k[i].assign(bytes, 0);
    c.v[i].assign(bytes, 0);
  }
  return c;
}

StepOutput OrtGraph::prefill(const std::vector<int64_t>& ids, KVCache& cache, const Mask& mask,
                             bool want_stats) const {
  if (cache.length != 0) throw InputError("prefill needs an empty cache");
  return run(ids, cache, mask, want_stats);
}

StepOutput OrtGraph::decode(int64_t token, KVCache& cache, const Mask& mask, bool want_stats) const {
  return run({token}, cache, mask, want_stats);
}

StepOutput OrtGraph::run(const std::vector<int64_t>& ids_in, KVCache& cache, const Mask& mask,
                         bool want_stats) const {
  const int64_t t = static_cast<int64_t>(ids_in.size());
  const int64_t total = cache.length + t;
  if (total > cache.capacity) {
    throw InputError("KV cache holds " + std::to_string(cache.capacity) + " positions; " + std::to_string(total) +
                     " requested");
  }
  for (int j = 0; j < n_; j += 2) {  // a cached attention cannot be skipped in this graph (no conditional KV)
    if (mask.skip[j] && cache.k.count(j / 2)) {
      throw Error("the policy skips attention " + std::to_string(j / 2) + " whose KV the graph updates in place");
    }
  }
  const OrtMemoryInfo* cpu = session_->cpu;
  // inputs in kInputs' order
  std::vector<int64_t> ids = ids_in, positions(t), last_index = {t - 1};
  for (int64_t p = 0; p < t; ++p) positions[p] = cache.length + p;
  std::vector<float> scale(mask.scales.begin(), mask.scales.end());  // float64 plan scales -> float32, as Python
  std::vector<int32_t> seqlens_k = {static_cast<int32_t>(total - 1)};
  int32_t total_len = static_cast<int32_t>(total);
  std::unique_ptr<bool[]> skip(new bool[n_]), valid(new bool[t]);
  for (int j = 0; j < n_; ++j) skip[j] = mask.skip[j];
  std::fill(valid.get(), valid.get() + t, true);
  bool want = want_stats;
  const int64_t row_t[] = {1, t}, row_n[] = {1, n_}, row_1[] = {1};

  std::vector<Ort::Value> in;
  in.push_back(Ort::Value::CreateTensor<int64_t>(cpu, ids.data(), ids.size(), row_t, 2));
  in.push_back(Ort::Value::CreateTensor<int64_t>(cpu, positions.data(), positions.size(), row_t, 2));
  in.push_back(Ort::Value::CreateTensor<bool>(cpu, valid.get(), t, row_t, 2));
  in.push_back(Ort::Value::CreateTensor<int32_t>(cpu, seqlens_k.data(), 1, row_1, 1));
  in.push_back(Ort::Value::CreateTensor<int32_t>(cpu, &total_len, 1, nullptr, 0));
  in.push_back(Ort::Value::CreateTensor<int64_t>(cpu, last_index.data(), 1, row_1, 1));
  in.push_back(Ort::Value::CreateTensor<bool>(cpu, skip.get(), n_, row_n, 2));
  in.push_back(Ort::Value::CreateTensor<float>(cpu, scale.data(), scale.size(), row_n, 2));
  in.push_back(Ort::Value::CreateTensor<bool>(cpu, &want, 1, nullptr, 0));

  // outputs in kOutputs' order, all preallocated
  std::vector<float> logits(model_.vocab_size), sim(n_), ratio(n_);
  const int64_t row_v[] = {1, model_.vocab_size};
  std::vector<Ort::Value> out;
  out.push_back(Ort::Value::CreateTensor<float>(cpu, logits.data(), logits.size(), row_v, 2));
  out.push_back(Ort::Value::CreateTensor<float>(cpu, sim.data(), sim.size(), row_n, 2));
  out.push_back(Ort::Value::CreateTensor<float>(cpu, ratio.data(), ratio.size(), row_n, 2));

  // past and present are the same memory: the kernel appends the new tokens in place
  const int64_t bnsh[] = {1, model_.num_kv_heads, cache.capacity, model_.head_dim};
  for (int i : kv_layers_) {
    for (auto* buf : {&cache.k.at(i), &cache.v.at(i)}) {
      const auto type = static_cast<ONNXTensorElementDataType>(cache.element_type);
      in.push_back(Ort::Value::CreateTensor(cpu, buf->data(), buf->size(), bnsh, 4, type));
      out.push_back(Ort::Value::CreateTensor(cpu, buf->data(), buf->size(), bnsh, 4, type));
    }
  }
  std::vector<const char*> in_names, out_names;
  for (const auto& s : session_->input_names) in_names.push_back(s.c_str());
  for (const auto& s : session_->output_names) out_names.push_back(s.c_str());
  try {
    session_->session.Run(Ort::RunOptions{nullptr}, in_names.data(), in.data(), in.size(), out_names.data(),
                          out.data(), out.size());
  } catch (const Ort::Exception& e) {
    throw Error(std::string("ONNX Runtime failed to run the graph: ") + e.what());
  }
  cache.length = static_cast<int>(total);

  StepOutput step;
  step.logits = std::move(logits);
  step.similarity.assign(sim.begin(), sim.end());
  step.norm_ratio.assign(ratio.begin(), ratio.end());
  for (int j = 0; j < n_; ++j) {  // skipped sublayers report nothing, as in every other engine
    if (mask.skip[j]) {
      step.similarity[j] = std::numeric_limits<double>::quiet_NaN();
      step.norm_ratio[j] = std::numeric_limits<double>::quiet_NaN();
    }
  }
  return step;
}

}  // namespace adaskip::detail
