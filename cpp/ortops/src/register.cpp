// The library's entry point: SessionOptions.register_custom_ops_library(path) in Python, or
// RegisterCustomOpsLibrary in C/C++, calls RegisterCustomOps with the loading process's ONNX Runtime.
#include <onnxruntime_cxx_api.h>

#include <mutex>

#include "decode_gqa_op.h"

namespace {
constexpr const char* kDomain = "com.adaskip";
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));  // the headers' API version: newer runtimes still serve it
  static adaskip::ortops::DecodeGqaOp decode_gqa;
  static std::once_flag once;
  static Ort::CustomOpDomain* domain = nullptr;  // lives as long as the process: sessions keep pointers into it
  try {
    std::call_once(once, [] {
      domain = new Ort::CustomOpDomain(kDomain);
      domain->Add(&decode_gqa);
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}
