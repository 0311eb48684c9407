// IOSimilarity: the AdaSkip input/output similarity of one sublayer, per request.
//
//   IOSimilarity(h_in [B,T,D], h_out [B,T,D], valid [B,T]) -> similarity [B,1], norm_ratio [B,1]
//
//   cos_t      = dot(h_in_t, h_out_t) / max(|h_in_t| * |h_out_t|, eps)
//   similarity = sum_t valid_t * cos_t / max(sum_t valid_t, 1)
//   norm_ratio = sqrt(sum_t valid_t * |h_out_t|^2 / max(sum_t valid_t * |h_in_t|^2, eps))
//
// The same rule as adaskip/similarity.py and the ONNX function in adaskip/export/onnx/similarity_op.py. `valid` is
// used as a weight (multiplied in, like the ONNX body), so 0/1 masks select tokens and the results agree with the
// ONNX function for every finite input.
//
// This header is plain C (usable from ctypes) with a small C++ convenience layer.
#ifndef ADASKIP_SIMILARITY_H
#define ADASKIP_SIMILARITY_H

#include <stdint.h>

#if defined(_WIN32)
#define ADASKIP_SIM_API __declspec(dllexport)
#else
#define ADASKIP_SIM_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Element types of h_in/h_out (and, for the CUDA kernel, of valid and the outputs). Values are part of the ABI.
enum adaskip_dtype {
    ADASKIP_DTYPE_F32 = 0,
    ADASKIP_DTYPE_F16 = 1,   // IEEE binary16, passed as raw 16-bit words
    ADASKIP_DTYPE_BF16 = 2,  // bfloat16, passed as raw 16-bit words
};

// Status codes returned by every entry point. Values are part of the ABI.
enum adaskip_status {
    ADASKIP_OK = 0,
    ADASKIP_ERR_INVALID_ARGUMENT = 1,  // null pointer, negative or too large dimension
    ADASKIP_ERR_UNSUPPORTED_DTYPE = 2,
    ADASKIP_ERR_CUDA = 3,              // a CUDA runtime call failed (CUDA entry points only)
};

// The epsilon of the reference implementation (adaskip.similarity.EPS).
#define ADASKIP_SIMILARITY_EPS 1e-12f

// Human-readable name of a status code (static storage, never null).
ADASKIP_SIM_API const char* adaskip_status_string(int status);

// CPU reference. h_in, h_out: contiguous [batch, tokens, hidden] of `dtype`; valid: contiguous [batch, tokens]
// float32; similarity, norm_ratio: [batch] float32 (the [B,1] outputs, contiguous). Accumulates in double, so fp32
// results are the correctly rounded value of the rule to within a few ulps. Returns an adaskip_status.
ADASKIP_SIM_API int adaskip_io_similarity_cpu(int dtype, const void* h_in, const void* h_out, const float* valid,
                                              int64_t batch, int64_t tokens, int64_t hidden, float eps,
                                              float* similarity, float* norm_ratio);

// Scalar conversions used by the CPU kernel, exported so tests and callers convert the same way.
ADASKIP_SIM_API float adaskip_f16_to_f32(uint16_t bits);
ADASKIP_SIM_API float adaskip_bf16_to_f32(uint16_t bits);
// Round to nearest even (NaN stays NaN, overflow becomes infinity).
ADASKIP_SIM_API uint16_t adaskip_f32_to_f16(float value);
ADASKIP_SIM_API uint16_t adaskip_f32_to_bf16(float value);

#ifdef __cplusplus
}  // extern "C"

namespace adaskip {

enum class DType : int { kF32 = ADASKIP_DTYPE_F32, kF16 = ADASKIP_DTYPE_F16, kBF16 = ADASKIP_DTYPE_BF16 };

// Typed front door to the CPU reference; returns an adaskip_status.
inline int ioSimilarityCpu(DType dtype, const void* h_in, const void* h_out, const float* valid, int64_t batch,
                           int64_t tokens, int64_t hidden, float* similarity, float* norm_ratio,
                           float eps = ADASKIP_SIMILARITY_EPS) {
    return adaskip_io_similarity_cpu(static_cast<int>(dtype), h_in, h_out, valid, batch, tokens, hidden, eps,
                                     similarity, norm_ratio);
}

}  // namespace adaskip
#endif  // __cplusplus

#endif  // ADASKIP_SIMILARITY_H
