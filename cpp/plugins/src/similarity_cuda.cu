// CUDA IOSimilarity: see include/adaskip/similarity_cuda.h for the contract and similarity.h for the rule.
//
// Pass 1 (tokenStats): one block per token reads h_in and h_out once, accumulating dot, |h_in|^2 and |h_out|^2 in
// fp32 registers (16-byte vector loads when rows are aligned), reduces them across the block (warp shuffles, then
// one shared-memory slot per warp) and stores the token's cosine and both squared norms in the workspace.
// Pass 2 (rowReduce): one block per batch row sums valid-weighted cosines, weights and norms over the tokens and
// writes similarity and norm_ratio. Two passes keep the result deterministic (no atomics).
#include "adaskip/similarity_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;

// ---- element conversions (fp32 math for every storage type) ----
__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T fromFloat(float x);
template <>
__device__ __forceinline__ float fromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half fromFloat<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- reductions: the sum of N values per thread, valid in thread 0 afterwards ----
template <int N>
__device__ __forceinline__ void warpSum(float (&v)[N]) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
    }
}

// blockDim.x must be a multiple of 32 (every launch below guarantees it), so all lanes of every warp take part.
template <int N>
__device__ __forceinline__ void blockSum(float (&v)[N]) {
    __shared__ float partial[N][kMaxThreads / kWarp];
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    warpSum<N>(v);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) partial[i][warp] = v[i];
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / kWarp;
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = lane < warps ? partial[i][lane] : 0.0f;
        warpSum<N>(v);
    }
}

// kVec elements per load: 16 bytes when the rows allow it, else 1.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
    T v[kVec];
};

// Pass 1. stats: [3][tokens_total] floats = cos, |h_in|^2, |h_out|^2 per token.
template <typename T, int kVec>
__global__ void tokenStats(const T* __restrict__ h_in, const T* __restrict__ h_out, int64_t hidden,
                           int64_t tokens_total, float eps, float* __restrict__ stats) {
    const int64_t token = blockIdx.x;
    const auto* a = reinterpret_cast<const Pack<T, kVec>*>(h_in + token * hidden);
    const auto* b = reinterpret_cast<const Pack<T, kVec>*>(h_out + token * hidden);
    const int64_t packs = hidden / kVec;

    float acc[3] = {0.0f, 0.0f, 0.0f};  // dot, |h_in|^2, |h_out|^2
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
        const Pack<T, kVec> pa = a[i];
        const Pack<T, kVec> pb = b[i];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
            const float x = toFloat(pa.v[k]);
            const float y = toFloat(pb.v[k]);
            acc[0] = fmaf(x, y, acc[0]);
            acc[1] = fmaf(x, x, acc[1]);
            acc[2] = fmaf(y, y, acc[2]);
        }
    }
    blockSum<3>(acc);
    if (threadIdx.x == 0) {
        // sqrt of each norm, then the product: the same order as the ONNX body and the CPU reference.
        stats[token] = acc[0] / fmaxf(sqrtf(acc[1]) * sqrtf(acc[2]), eps);
        stats[tokens_total + token] = acc[1];
        stats[2 * tokens_total + token] = acc[2];
    }
}

// Pass 2: one block per batch row.
template <typename T, typename M>
__global__ void rowReduce(const float* __restrict__ stats, const M* __restrict__ valid, int64_t tokens,
                          int64_t tokens_total, float eps, T* __restrict__ similarity, T* __restrict__ norm_ratio) {
    const int64_t row = blockIdx.x;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // sum w*cos, sum w, sum w*|h_in|^2, sum w*|h_out|^2
    for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) {
        const int64_t token = row * tokens + t;
        const float w = toFloat(valid[token]);
        acc[0] = fmaf(w, stats[token], acc[0]);
        acc[1] += w;
        acc[2] = fmaf(w, stats[tokens_total + token], acc[2]);
        acc[3] = fmaf(w, stats[2 * tokens_total + token], acc[3]);
    }
    blockSum<4>(acc);
    if (threadIdx.x == 0) {
        similarity[row] = fromFloat<T>(acc[0] / fmaxf(acc[1], 1.0f));
        norm_ratio[row] = fromFloat<T>(sqrtf(acc[3] / fmaxf(acc[2], eps)));
    }
}

thread_local std::string g_last_error;

int cudaFailed(cudaError_t err, const char* what) {
    g_last_error = std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
    return ADASKIP_ERR_CUDA;
}

int threadsFor(int64_t work) {
    const int64_t rounded = (work + kWarp - 1) / kWarp * kWarp;
    return static_cast<int>(rounded < kWarp ? kWarp : (rounded > kMaxThreads ? kMaxThreads : rounded));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename M>
int launchTyped(const void* h_in, const void* h_out, const void* valid, int64_t batch, int64_t tokens,
                int64_t hidden, float eps, void* similarity, void* norm_ratio, void* workspace, cudaStream_t stream) {
    const int64_t tokens_total = batch * tokens;
    auto* stats = static_cast<float*>(workspace);
    if (tokens_total > 0) {
        constexpr int kVec = 16 / sizeof(T);
        const auto* a = static_cast<const T*>(h_in);
        const auto* b = static_cast<const T*>(h_out);
        if (hidden % kVec == 0 && aligned16(h_in) && aligned16(h_out)) {
            tokenStats<T, kVec><<<static_cast<unsigned>(tokens_total), threadsFor(hidden / kVec), 0, stream>>>(
                a, b, hidden, tokens_total, eps, stats);
        } else {
            tokenStats<T, 1><<<static_cast<unsigned>(tokens_total), threadsFor(hidden), 0, stream>>>(
                a, b, hidden, tokens_total, eps, stats);
        }
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return cudaFailed(err, "IOSimilarity token pass launch");
    }
    rowReduce<T, M><<<static_cast<unsigned>(batch), threadsFor(tokens), 0, stream>>>(
        stats, static_cast<const M*>(valid), tokens, tokens_total, eps, static_cast<T*>(similarity),
        static_cast<T*>(norm_ratio));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cudaFailed(err, "IOSimilarity row pass launch");
    return ADASKIP_OK;
}

template <typename T>
int dispatchValid(int valid_dtype, const void* h_in, const void* h_out, const void* valid, int64_t batch,
                  int64_t tokens, int64_t hidden, float eps, void* similarity, void* norm_ratio, void* workspace,
                  cudaStream_t stream) {
    switch (valid_dtype) {
        case ADASKIP_DTYPE_F32:
            return launchTyped<T, float>(h_in, h_out, valid, batch, tokens, hidden, eps, similarity, norm_ratio,
                                         workspace, stream);
        case ADASKIP_DTYPE_F16:
            return launchTyped<T, __half>(h_in, h_out, valid, batch, tokens, hidden, eps, similarity, norm_ratio,
                                          workspace, stream);
        case ADASKIP_DTYPE_BF16:
            return launchTyped<T, __nv_bfloat16>(h_in, h_out, valid, batch, tokens, hidden, eps, similarity,
                                                 norm_ratio, workspace, stream);
        default:
            return ADASKIP_ERR_UNSUPPORTED_DTYPE;
    }
}

size_t elementSize(int dtype) { return dtype == ADASKIP_DTYPE_F32 ? 4 : 2; }

bool knownDtype(int dtype) {
    return dtype == ADASKIP_DTYPE_F32 || dtype == ADASKIP_DTYPE_F16 || dtype == ADASKIP_DTYPE_BF16;
}

// Shape checks shared by both entry points; the grid's x dimension bounds tokens and batch.
int checkShape(int64_t batch, int64_t tokens, int64_t hidden) {
    if (batch < 0 || tokens < 0 || hidden < 0) return ADASKIP_ERR_INVALID_ARGUMENT;
    int64_t tokens_total = 0, elems = 0;
    if (__builtin_mul_overflow(batch, tokens, &tokens_total) || __builtin_mul_overflow(tokens_total, hidden, &elems)) {
        return ADASKIP_ERR_INVALID_ARGUMENT;
    }
    if (tokens_total > INT_MAX || batch > INT_MAX) return ADASKIP_ERR_INVALID_ARGUMENT;
    return ADASKIP_OK;
}

// Device buffer freed on scope exit, so every error path of the host helper cleans up.
struct DeviceBuffer {
    void* ptr = nullptr;
    ~DeviceBuffer() {
        if (ptr) cudaFree(ptr);
    }
};

}  // namespace

extern "C" {

size_t adaskip_io_similarity_cuda_workspace_bytes(int64_t batch, int64_t tokens) {
    if (batch <= 0 || tokens <= 0) return 0;
    return static_cast<size_t>(batch) * static_cast<size_t>(tokens) * 3 * sizeof(float);
}

int adaskip_io_similarity_cuda(int dtype, int valid_dtype, const void* h_in, const void* h_out, const void* valid,
                               int64_t batch, int64_t tokens, int64_t hidden, float eps, void* similarity,
                               void* norm_ratio, void* workspace, void* stream) {
    if (const int status = checkShape(batch, tokens, hidden)) return status;
    if (!knownDtype(dtype) || !knownDtype(valid_dtype)) return ADASKIP_ERR_UNSUPPORTED_DTYPE;
    if (!(eps >= 0.0f)) return ADASKIP_ERR_INVALID_ARGUMENT;
    if (batch == 0) return ADASKIP_OK;
    const bool has_tokens = tokens > 0;
    if (!similarity || !norm_ratio || (has_tokens && (!valid || !workspace)) ||
        (has_tokens && hidden > 0 && (!h_in || !h_out))) {
        return ADASKIP_ERR_INVALID_ARGUMENT;
    }
    const auto s = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case ADASKIP_DTYPE_F32:
            return dispatchValid<float>(valid_dtype, h_in, h_out, valid, batch, tokens, hidden, eps, similarity,
                                        norm_ratio, workspace, s);
        case ADASKIP_DTYPE_F16:
            return dispatchValid<__half>(valid_dtype, h_in, h_out, valid, batch, tokens, hidden, eps, similarity,
                                         norm_ratio, workspace, s);
        default:
            return dispatchValid<__nv_bfloat16>(valid_dtype, h_in, h_out, valid, batch, tokens, hidden, eps,
                                                similarity, norm_ratio, workspace, s);
    }
}

int adaskip_io_similarity_cuda_host(int dtype, int valid_dtype, const void* h_in, const void* h_out,
                                    const void* valid, int64_t batch, int64_t tokens, int64_t hidden, float eps,
                                    void* similarity, void* norm_ratio) {
    if (const int status = checkShape(batch, tokens, hidden)) return status;
    if (!knownDtype(dtype) || !knownDtype(valid_dtype)) return ADASKIP_ERR_UNSUPPORTED_DTYPE;
    const size_t elem = elementSize(dtype);
    const size_t h_bytes = static_cast<size_t>(batch * tokens * hidden) * elem;
    const size_t v_bytes = static_cast<size_t>(batch * tokens) * elementSize(valid_dtype);
    const size_t o_bytes = static_cast<size_t>(batch) * elem;
    if (batch == 0) return ADASKIP_OK;
    if (!similarity || !norm_ratio || (v_bytes && !valid) || (h_bytes && (!h_in || !h_out))) {
        return ADASKIP_ERR_INVALID_ARGUMENT;
    }

    DeviceBuffer d_in, d_out, d_valid, d_sim, d_ratio, d_work;
    // Zero-byte buffers stay null, which the launcher accepts exactly when their size is 0.
    auto alloc = [](DeviceBuffer& buf, size_t bytes) { return bytes ? cudaMalloc(&buf.ptr, bytes) : cudaSuccess; };
    cudaError_t err = cudaSuccess;
    if ((err = alloc(d_in, h_bytes)) != cudaSuccess || (err = alloc(d_out, h_bytes)) != cudaSuccess ||
        (err = alloc(d_valid, v_bytes)) != cudaSuccess || (err = alloc(d_sim, o_bytes)) != cudaSuccess ||
        (err = alloc(d_ratio, o_bytes)) != cudaSuccess ||
        (err = alloc(d_work, adaskip_io_similarity_cuda_workspace_bytes(batch, tokens))) != cudaSuccess) {
        return cudaFailed(err, "cudaMalloc");
    }
    if ((h_bytes && (err = cudaMemcpy(d_in.ptr, h_in, h_bytes, cudaMemcpyHostToDevice)) != cudaSuccess) ||
        (h_bytes && (err = cudaMemcpy(d_out.ptr, h_out, h_bytes, cudaMemcpyHostToDevice)) != cudaSuccess) ||
        (v_bytes && (err = cudaMemcpy(d_valid.ptr, valid, v_bytes, cudaMemcpyHostToDevice)) != cudaSuccess)) {
        return cudaFailed(err, "cudaMemcpy to device");
    }
    const int status = adaskip_io_similarity_cuda(dtype, valid_dtype, d_in.ptr, d_out.ptr, d_valid.ptr, batch,
                                                  tokens, hidden, eps, d_sim.ptr, d_ratio.ptr, d_work.ptr, nullptr);
    if (status != ADASKIP_OK) return status;
    if ((err = cudaDeviceSynchronize()) != cudaSuccess) return cudaFailed(err, "IOSimilarity kernels");
    if ((err = cudaMemcpy(similarity, d_sim.ptr, o_bytes, cudaMemcpyDeviceToHost)) != cudaSuccess ||
        (err = cudaMemcpy(norm_ratio, d_ratio.ptr, o_bytes, cudaMemcpyDeviceToHost)) != cudaSuccess) {
        return cudaFailed(err, "cudaMemcpy to host");
    }
    return ADASKIP_OK;
}

int adaskip_cuda_device_count(void) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaFailed(err, "cudaGetDeviceCount");
        cudaGetLastError();  // clear it so later calls do not see a stale error
        return 0;
    }
    return count;
}

const char* adaskip_cuda_last_error(void) { return g_last_error.c_str(); }

}  // extern "C"
