#pragma once

#include <onnxruntime_cxx_api.h>

namespace adaskip::ortops {

constexpr size_t kInputs = 10;  // GroupQueryAttention's query ... position_ids
constexpr size_t kOutputs = 3;  // output, present_key, present_value

class DecodeGqaKernel {
 public:
  DecodeGqaKernel(const OrtApi& api, const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  void Compute(OrtKernelContext* context);
  void ComputePrompt(OrtKernelContext* context, int64_t batch, int64_t tokens, int64_t dim,
                     ONNXTensorElementDataType cache_type);
  template <typename Cache>  // float, or _Float16
  void Decode(OrtKernelContext* context, int64_t batch, int64_t dim, bool packed);
  int64_t num_heads_, kv_heads_, window_;
  bool do_rotary_;
  float scale_;
  // the present outputs' type (float32 when the node has none: a step without them keeps its cache to itself)
  ONNXTensorElementDataType output_cache_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  Ort::Op prompt_op_{nullptr};  // ONNX Runtime's own GroupQueryAttention, for steps of more than one token per row
};

struct DecodeGqaOp : Ort::CustomOpBase<DecodeGqaOp, DecodeGqaKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return "DecodeGroupQueryAttention"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return kOutputs; }
  // present_key, present_value: the past's type (float32 or float16)
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const;
};

}  // namespace adaskip::ortops
