// CUDA IOSimilarity (same rule as adaskip/similarity.h), for the TensorRT plugin and direct use.
//
// Two kernels on the caller's stream: one block per token computes dot(h_in, h_out), |h_in|^2 and |h_out|^2 in a
// single pass (fp32 accumulation, warp-shuffle + shared-memory block reduction) and the token's cosine; then one
// block per batch row reduces the valid-weighted sums over tokens into similarity [B,1] and norm_ratio [B,1].
// The per-token results live in a caller-provided workspace of adaskip_io_similarity_cuda_workspace_bytes().
#ifndef ADASKIP_SIMILARITY_CUDA_H
#define ADASKIP_SIMILARITY_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "adaskip/similarity.h"

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of device workspace the launcher needs for `batch * tokens` tokens (0 when there are none).
ADASKIP_SIM_API size_t adaskip_io_similarity_cuda_workspace_bytes(int64_t batch, int64_t tokens);

// Enqueue IOSimilarity on `stream` (a cudaStream_t; null = the legacy default stream). All pointers are device
// pointers to contiguous tensors: h_in, h_out [batch, tokens, hidden] of `dtype`; valid [batch, tokens] of
// `valid_dtype`; similarity and norm_ratio [batch] of `dtype` (the ONNX op's outputs have the input's type).
// workspace: at least adaskip_io_similarity_cuda_workspace_bytes(batch, tokens) bytes, 4-byte aligned.
// Returns an adaskip_status; ADASKIP_ERR_CUDA when a launch failed (the CUDA error stays queryable).
ADASKIP_SIM_API int adaskip_io_similarity_cuda(int dtype, int valid_dtype, const void* h_in, const void* h_out,
                                               const void* valid, int64_t batch, int64_t tokens, int64_t hidden,
                                               float eps, void* similarity, void* norm_ratio, void* workspace,
                                               void* stream);

// Convenience for tests and bindings: host buffers in, host buffers out (copies, runs, synchronizes). Same layout
// and types as adaskip_io_similarity_cuda.
ADASKIP_SIM_API int adaskip_io_similarity_cuda_host(int dtype, int valid_dtype, const void* h_in, const void* h_out,
                                                    const void* valid, int64_t batch, int64_t tokens,
                                                    int64_t hidden, float eps, void* similarity, void* norm_ratio);

// Number of CUDA devices usable by this process; 0 when there is no device or no driver.
ADASKIP_SIM_API int adaskip_cuda_device_count(void);

// Message of the last CUDA error seen by this library's entry points on the calling thread ("" if none).
ADASKIP_SIM_API const char* adaskip_cuda_last_error(void);

#ifdef __cplusplus
}  // extern "C"

struct CUstream_st;  // cudaStream_t is CUstream_st*: declared here so this header needs no CUDA include path

namespace adaskip {

// Typed host launcher (what the TensorRT plugin's enqueue calls). Returns an adaskip_status.
inline int launchIOSimilarity(DType dtype, DType valid_dtype, const void* h_in, const void* h_out, const void* valid,
                              int64_t batch, int64_t tokens, int64_t hidden, float eps, void* similarity,
                              void* norm_ratio, void* workspace, CUstream_st* stream) {
    return adaskip_io_similarity_cuda(static_cast<int>(dtype), static_cast<int>(valid_dtype), h_in, h_out, valid,
                                      batch, tokens, hidden, eps, similarity, norm_ratio, workspace, stream);
}

}  // namespace adaskip
#endif  // __cplusplus

#endif  // ADASKIP_SIMILARITY_CUDA_H
