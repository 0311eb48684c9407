// com.adaskip DecodeGroupQueryAttention: ONNX Runtime's GroupQueryAttention (com.microsoft) with the same inputs 0-9,
// outputs 0-2 and attributes, so a graph swaps the node's op type and domain and nothing else. A step of one new
// token per row (decode) runs on decode_attention.h's kernel over the shared, in-place BNSH cache; a step of more
// (a prompt or a prompt chunk) is handed to ONNX Runtime's own GroupQueryAttention kernel, created once per node
// through the standalone-op API, so one session serves both and holds the weights once. Supported: packed or
// separate q/k/v, do_rotary with half-split tables (rotary_interleaved = 0), local_window_size, scale, float32 or
// float16 caches (GroupQueryAttention's T_CACHE; the math stays float32). Anything else (int8 caches, softcap, smooth
// softmax, interleaved rotary) is refused with a message.
#include "decode_gqa_op.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode_attention.h"
#include "vector_math.h"

namespace adaskip::ortops {
namespace {

int64_t attr_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = fallback;
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, &value)) {  // absent: the schema's default
    api.ReleaseStatus(status);
    return fallback;
  }
  return value;
}

float attr_float(const OrtApi& api, const OrtKernelInfo* info, const char* name, float fallback) {
  float value = fallback;
  if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, name, &value)) {
    api.ReleaseStatus(status);
    return fallback;
  }
  return value;
}

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

bool present(const Ort::ConstValue& v) { return static_cast<const OrtValue*>(v) != nullptr; }

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("DecodeGroupQueryAttention: " + what); }

std::string dims(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

DecodeGqaKernel::DecodeGqaKernel(const OrtApi& api, const OrtKernelInfo* info) {
  num_heads_ = attr_int(api, info, "num_heads", 0);
  kv_heads_ = attr_int(api, info, "kv_num_heads", 0);
  do_rotary_ = attr_int(api, info, "do_rotary", 0) != 0;
  window_ = attr_int(api, info, "local_window_size", -1);
  scale_ = attr_float(api, info, "scale", 0.f);
  if (num_heads_ < 1 || kv_heads_ < 1 || num_heads_ % kv_heads_ != 0)
    fail("num_heads (" + std::to_string(num_heads_) + ") must be a positive multiple of kv_num_heads (" +
         std::to_string(kv_heads_) + ")");
  if (attr_int(api, info, "rotary_interleaved", 0) != 0) fail("rotary_interleaved = 1 is not supported");
  if (attr_float(api, info, "softcap", 0.f) != 0.f) fail("softcap is not supported");
  if (attr_int(api, info, "smooth_softmax", 0) != 0) fail("smooth_softmax is not supported");
  if (attr_int(api, info, "kv_cache_bit_width", 0) != 0) fail("quantized KV caches are not supported");
  // the present outputs' type where the node has them: a step without a past writes its cache in that type
  Ort::ConstKernelInfo node(info);
  if (node.GetOutputCount() > 1 && !node.GetOutputName(1).empty()) {
    const ONNXTensorElementDataType type =
        node.GetOutputTypeInfo(1).GetTensorTypeAndShapeInfo().GetElementType();
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      fail("the KV cache must be float32 or float16");
    output_cache_type_ = type;
  }
  // the prompt path: GroupQueryAttention with this node's attributes (the refused ones at their defaults)
  const int64_t ints[] = {num_heads_, kv_heads_, do_rotary_ ? 1 : 0, window_};
  const Ort::OpAttr attrs[] = {Ort::OpAttr("num_heads", &ints[0], 1, ORT_OP_ATTR_INT),
                               Ort::OpAttr("kv_num_heads", &ints[1], 1, ORT_OP_ATTR_INT),
                               Ort::OpAttr("do_rotary", &ints[2], 1, ORT_OP_ATTR_INT),
                               Ort::OpAttr("local_window_size", &ints[3], 1, ORT_OP_ATTR_INT),
                               Ort::OpAttr("scale", &scale_, 1, ORT_OP_ATTR_FLOAT)};
  const char* type_names[] = {"T", "M"};
  const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32};
  prompt_op_ = Ort::Op::Create(info, "GroupQueryAttention", "com.microsoft", 1, type_names, types, 2, attrs, 5,
                               kInputs, kOutputs);
}

void DecodeGqaKernel::ComputePrompt(OrtKernelContext* context, int64_t batch, int64_t tokens, int64_t dim,
                                    ONNXTensorElementDataType cache_type) {
  Ort::KernelContext ctx(context);
  const OrtValue* inputs[kInputs];
  for (size_t i = 0; i < kInputs; ++i) inputs[i] = ctx.GetInput(i);  // absent optional inputs: null, as in a graph
  // GroupQueryAttention's present shape: the past buffer's capacity, or the total length where that is longer
  const Ort::ConstValue past_key = ctx.GetInput(3), past_value = ctx.GetInput(4), total_length = ctx.GetInput(6);
  const int64_t total = *total_length.GetTensorData<int32_t>();
  const int64_t capacity = present(past_key) ? shape_of(past_key)[2] : 0;
  const int64_t present_length = std::max(total, capacity);
  const std::vector<int64_t> cache_shape{batch, kv_heads_, present_length, dim};
  OrtValue* outputs[kOutputs];
  std::vector<Ort::Value> own;  // float32 caches the kernel writes that are not the graph's outputs
  own.reserve(2);
  auto own_cache = [&]() -> OrtValue* {
    own.push_back(Ort::Value::CreateTensor<float>(Ort::AllocatorWithDefaultOptions(), cache_shape.data(),
                                                  cache_shape.size()));
    return own.back();
  };
  outputs[0] = ctx.GetOutput(0, {batch, tokens, num_heads_ * dim});
  Ort::UnownedValue present_cache[2] = {ctx.GetOutput(1, cache_shape), ctx.GetOutput(2, cache_shape)};
  if (cache_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {  // present outputs the graph does not take: still written
    for (int c = 0; c < 2; ++c)
      outputs[1 + c] = present_cache[c] ? static_cast<OrtValue*>(present_cache[c]) : own_cache();
    return prompt_op_.Invoke(context, inputs, kInputs, outputs, kOutputs);
  }

  // A float16 cache: ONNX Runtime's kernel for float queries over a float16 cache converts the whole buffer, so its
  // float kernel runs here over float copies of the positions in use (bound as its past and present at once, in
  // place), and those positions go back as float16. Positions from `total` on are neither read nor written.
  const int64_t used = std::min(total, capacity), pairs = batch * kv_heads_;
  const Ort::ConstValue past[2] = {past_key, past_value};
  for (int c = 0; c < 2; ++c) {
    OrtValue* copy = own_cache();
    if (present(past[c])) {
      const _Float16* src = past[c].GetTensorData<_Float16>();
      float* dst = Ort::UnownedValue(copy).GetTensorMutableData<float>();
      for (int64_t pair = 0; pair < pairs; ++pair)
        widen(src + pair * capacity * dim, dst + pair * present_length * dim, used * dim);
      inputs[3 + c] = copy;
    }
    outputs[1 + c] = copy;
  }
  prompt_op_.Invoke(context, inputs, kInputs, outputs, kOutputs);
  for (int c = 0; c < 2; ++c) {
    if (!present_cache[c]) continue;
    _Float16* dst = present_cache[c].GetTensorMutableData<_Float16>();
    if (present(past[c]) && past[c].GetTensorRawData() != dst) {  // present apart from past: past's positions first
      const _Float16* src = past[c].GetTensorData<_Float16>();
      for (int64_t pair = 0; pair < pairs; ++pair)
        std::memcpy(dst + pair * present_length * dim, src + pair * capacity * dim,
                    static_cast<size_t>(capacity * dim) * sizeof(_Float16));
    }
    const float* src = Ort::ConstValue(outputs[1 + c]).GetTensorData<float>();
    for (int64_t pair = 0; pair < pairs; ++pair)
      narrow(src + pair * present_length * dim, dst + pair * present_length * dim, total * dim);
  }
}

void DecodeGqaKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const Ort::ConstValue query = ctx.GetInput(0), key = ctx.GetInput(1), value = ctx.GetInput(2);
  const Ort::ConstValue past_key = ctx.GetInput(3), past_value = ctx.GetInput(4);

  const std::vector<int64_t> qshape = shape_of(query);
  if (qshape.size() != 3) fail("query must be [batch, tokens, hidden]; got " + dims(qshape));
  const int64_t batch = qshape[0], width = qshape[2];
  const bool packed = !present(key);
  if (packed == present(value)) fail("key and value must both be given or both be absent (packed query)");
  const int64_t heads_in_query = packed ? num_heads_ + 2 * kv_heads_ : num_heads_;
  if (width % heads_in_query != 0) fail("query width " + std::to_string(width) + " is not a whole number of heads");
  const int64_t dim = width / heads_in_query;
  if (present(past_key) != present(past_value)) fail("past_key and past_value must both be given or both absent");
  ONNXTensorElementDataType cache_type = output_cache_type_;  // the type the step writes its cache in
  if (present(past_key)) {
    cache_type = past_key.GetTensorTypeAndShapeInfo().GetElementType();
    if (past_value.GetTensorTypeAndShapeInfo().GetElementType() != cache_type)
      fail("past_key and past_value must be of one type");
    if (cache_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && cache_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      fail("the KV cache must be float32 or float16");
    if (cache_type != output_cache_type_) fail("the present outputs must be of the past's type");
  }
  if (qshape[1] != 1) return ComputePrompt(context, batch, qshape[1], dim, cache_type);
  if (dim % kLanes != 0) fail("head size must be a multiple of 16; got " + std::to_string(dim));
  if (cache_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return Decode<_Float16>(context, batch, dim, packed);
  Decode<float>(context, batch, dim, packed);
}

template <typename Cache>
void DecodeGqaKernel::Decode(OrtKernelContext* context, int64_t batch, int64_t dim, bool packed) {
  Ort::KernelContext ctx(context);
  const Ort::ConstValue query = ctx.GetInput(0), key = ctx.GetInput(1), value = ctx.GetInput(2);
  const Ort::ConstValue past_key = ctx.GetInput(3), past_value = ctx.GetInput(4), seqlens = ctx.GetInput(5);
  const Ort::ConstValue cos_cache = ctx.GetInput(7), sin_cache = ctx.GetInput(8), position_ids = ctx.GetInput(9);
  const int64_t width = shape_of(query)[2];
  if (!packed) {
    for (const auto* kv : {&key, &value}) {
      const std::vector<int64_t> s = shape_of(*kv);
      if (s.size() != 3 || s[0] != batch || s[1] != 1 || s[2] != kv_heads_ * dim)
        fail("key and value must be [batch, 1, kv_num_heads * head_size]; got " + dims(s));
    }
  }
  const bool cached = present(past_key);
  int64_t capacity = 1;
  if (cached) {
    const std::vector<int64_t> ps = shape_of(past_key);
    if (ps.size() != 4 || ps[0] != batch || ps[1] != kv_heads_ || ps[3] != dim || shape_of(past_value) != ps)
      fail("past_key and past_value must be [batch, kv_num_heads, capacity, head_size] alike; got " + dims(ps) +
           " and " + dims(shape_of(past_value)));
    capacity = ps[2];
  }
  if (shape_of(seqlens) != std::vector<int64_t>{batch}) fail("seqlens_k must be [batch]");
  const int32_t* seqlens_k = seqlens.GetTensorData<int32_t>();

  // the cache this step appends to and reads: the present buffers (the past ones when bound to the same memory)
  const std::vector<int64_t> cache_shape{batch, kv_heads_, capacity, dim};
  Ort::UnownedValue present_key = ctx.GetOutput(1, cache_shape), present_value = ctx.GetOutput(2, cache_shape);
  std::vector<Cache> own_k, own_v;  // present outputs not wanted: the step's cache lives here
  Cache* k_cache = present_key ? present_key.GetTensorMutableData<Cache>() : nullptr;
  Cache* v_cache = present_value ? present_value.GetTensorMutableData<Cache>() : nullptr;
  const size_t cache_elems = static_cast<size_t>(batch * kv_heads_ * capacity * dim);
  if (!k_cache) k_cache = (own_k.resize(cache_elems), own_k.data());
  if (!v_cache) v_cache = (own_v.resize(cache_elems), own_v.data());
  if (cached) {  // past and present differ unless the caller shares the buffer: then nothing is copied
    const Cache* pk = past_key.GetTensorData<Cache>();
    const Cache* pv = past_value.GetTensorData<Cache>();
    if (pk != k_cache) std::memcpy(k_cache, pk, cache_elems * sizeof(Cache));
    if (pv != v_cache) std::memcpy(v_cache, pv, cache_elems * sizeof(Cache));
  }

  int64_t half = 0, table_rows = 0;
  const float *cos = nullptr, *sin = nullptr;
  if (do_rotary_) {
    if (!present(cos_cache) || !present(sin_cache)) fail("do_rotary needs cos_cache and sin_cache");
    const std::vector<int64_t> cs = shape_of(cos_cache);
    if (cs.size() != 2 || shape_of(sin_cache) != cs || 2 * cs[1] > dim)
      fail("cos_cache and sin_cache must be [max_position, rotary_dim / 2] alike, rotary_dim <= head size");
    table_rows = cs[0];
    half = cs[1];
    cos = cos_cache.GetTensorData<float>();
    sin = sin_cache.GetTensorData<float>();
  }
  const int64_t* positions = nullptr;
  if (present(position_ids)) {
    if (Ort::ConstValue(position_ids).GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(batch))
      fail("position_ids must hold one position per row");
    positions = position_ids.GetTensorData<int64_t>();
  }

  // every row is checked before any is written: a refused step leaves the cache as it was
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t at = cached ? seqlens_k[b] : 0;  // GQA's seqlens_k: the row's length after this token, minus 1
    if (at < 0 || at >= capacity)
      fail("seqlens_k[" + std::to_string(b) + "] = " + std::to_string(seqlens_k[b]) +
           " is outside the KV buffer of " + std::to_string(capacity) + " positions");
    const int64_t pos = positions ? positions[b] : seqlens_k[b];
    if (do_rotary_ && (pos < 0 || pos >= table_rows))
      fail("position " + std::to_string(pos) + " is outside the rotary tables of " + std::to_string(table_rows));
  }

  // per row: rotate q and the new k, append k and v at the row's length (in the cache's type: the step attends
  // over what later steps will read), attend over what the row then holds
  const float* qkv = query.GetTensorData<float>();
  std::vector<float> q(static_cast<size_t>(batch * num_heads_ * dim));
  std::vector<int64_t> lengths(static_cast<size_t>(batch));
  std::vector<float> k_new(static_cast<size_t>(kv_heads_ * dim));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t at = cached ? seqlens_k[b] : 0;
    const float* row = qkv + b * width;
    const float* k_src = packed ? row + num_heads_ * dim : key.GetTensorData<float>() + b * kv_heads_ * dim;
    const float* v_src = packed ? row + (num_heads_ + kv_heads_) * dim : value.GetTensorData<float>() + b * kv_heads_ * dim;
    float* qb = q.data() + b * num_heads_ * dim;
    std::memcpy(qb, row, static_cast<size_t>(num_heads_ * dim) * sizeof(float));
    std::memcpy(k_new.data(), k_src, k_new.size() * sizeof(float));
    if (do_rotary_) {
      const int64_t pos = positions ? positions[b] : seqlens_k[b];
      rotate_half(qb, num_heads_, dim, cos + pos * half, sin + pos * half, half);
      rotate_half(k_new.data(), kv_heads_, dim, cos + pos * half, sin + pos * half, half);
    }
    for (int64_t g = 0; g < kv_heads_; ++g) {
      const size_t slot = static_cast<size_t>(((b * kv_heads_ + g) * capacity + at) * dim);
      for (int64_t d = 0; d < dim; ++d) {
        k_cache[slot + d] = static_cast<Cache>(k_new[g * dim + d]);
        v_cache[slot + d] = static_cast<Cache>(v_src[g * dim + d]);
      }
    }
    lengths[b] = at + 1;
  }

  Ort::UnownedValue output = ctx.GetOutput(0, {batch, 1, num_heads_ * dim});
  const DecodeAttentionShape shape{batch, num_heads_, kv_heads_, dim, capacity, window_,
                                   scale_ != 0.f ? scale_ : 1.f / std::sqrt(static_cast<float>(dim))};
  ParallelFor parallel_for = [&ctx](size_t total, const std::function<void(size_t)>& fn) {
    ctx.ParallelFor([](void* data, size_t i) { (*static_cast<const std::function<void(size_t)>*>(data))(i); },
                    total, 0, const_cast<std::function<void(size_t)>*>(&fn));
  };
  decode_attention<Cache>(shape, q.data(), k_cache, v_cache, lengths.data(), output.GetTensorMutableData<float>(),
                          parallel_for);
}

OrtStatusPtr DecodeGqaKernel::ComputeV2(OrtKernelContext* context) {
  try {
    Compute(context);
    return nullptr;
  } catch (const std::exception& e) {  // a failed Run with the message, never an exception through the C API
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

OrtStatusPtr DecodeGqaOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  try {
    *kernel = new DecodeGqaKernel(api, info);
    return nullptr;
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

ONNXTensorElementDataType DecodeGqaOp::GetInputType(size_t index) const {
  switch (index) {
    case 5:
    case 6:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;  // seqlens_k, total_sequence_length
    case 9:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;  // position_ids
    case 3:
    case 4:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // past_key, past_value: float32 or float16 (checked per run)
    default:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

OrtCustomOpInputOutputCharacteristic DecodeGqaOp::GetInputCharacteristic(size_t index) const {
  const bool required = index == 0 || index == 5 || index == 6;
  return required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtCustomOpInputOutputCharacteristic DecodeGqaOp::GetOutputCharacteristic(size_t index) const {
  return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

}  // namespace adaskip::ortops
