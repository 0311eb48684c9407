// CUDA IOSimilarity against the CPU reference on deterministic pseudo-random data (fp32, fp16, bf16; aligned and
// unaligned hidden sizes; masks; batch > 1). Needs a GPU: exits with 77 (ctest SKIP_RETURN_CODE) when none is
// visible, so machines without one report the test as skipped, not passed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "adaskip/similarity.h"
#include "adaskip/similarity_cuda.h"
#include "check.h"

namespace {

constexpr int kSkip = 77;

float fromBits(int dtype, uint16_t bits) {
    return dtype == ADASKIP_DTYPE_F16 ? adaskip_f16_to_f32(bits) : adaskip_bf16_to_f32(bits);
}

void compareOne(int dtype, int valid_dtype, int64_t batch, int64_t tokens, int64_t hidden, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::bernoulli_distribution keep(0.7);
    const int64_t n = batch * tokens * hidden;
    std::vector<float> in(n), out(n), valid(batch * tokens);
    for (int64_t i = 0; i < n; ++i) {
        in[i] = normal(rng);
        out[i] = in[i] + 0.6f * normal(rng);  // correlated, like a residual stream before/after a sublayer
    }
    for (auto& v : valid) v = keep(rng) ? 1.0f : 0.0f;

    // Reference: the CPU kernel on exactly the values the GPU sees.
    std::vector<float> ref_sim(batch), ref_ratio(batch);
    std::vector<float> gpu_sim(batch), gpu_ratio(batch);
    int status = 0;
    char label[128];
    std::snprintf(label, sizeof label, "dtype %d valid %d [%lld,%lld,%lld]", dtype, valid_dtype,
                  static_cast<long long>(batch), static_cast<long long>(tokens), static_cast<long long>(hidden));
    if (dtype == ADASKIP_DTYPE_F32) {
        CHECK(adaskip_io_similarity_cpu(dtype, in.data(), out.data(), valid.data(), batch, tokens, hidden,
                                        ADASKIP_SIMILARITY_EPS, ref_sim.data(), ref_ratio.data()) == ADASKIP_OK);
        status = adaskip_io_similarity_cuda_host(dtype, ADASKIP_DTYPE_F32, in.data(), out.data(), valid.data(), batch,
                                                 tokens, hidden, ADASKIP_SIMILARITY_EPS, gpu_sim.data(),
                                                 gpu_ratio.data());
        CHECK(status == ADASKIP_OK);
        for (int64_t b = 0; b < batch; ++b) {
            CHECK_NEAR(gpu_sim[b], ref_sim[b], 1e-5, 0, label);
            CHECK_NEAR(gpu_ratio[b], ref_ratio[b], 1e-5, 1e-5, label);
        }
        return;
    }
    uint16_t (*to)(float) = dtype == ADASKIP_DTYPE_F16 ? adaskip_f32_to_f16 : adaskip_f32_to_bf16;
    std::vector<uint16_t> in16(n), out16(n), valid16(valid.size()), sim16(batch), ratio16(batch);
    for (int64_t i = 0; i < n; ++i) {
        in16[i] = to(in[i]);
        out16[i] = to(out[i]);
    }
    for (size_t i = 0; i < valid.size(); ++i) valid16[i] = to(valid[i]);
    CHECK(adaskip_io_similarity_cpu(dtype, in16.data(), out16.data(), valid.data(), batch, tokens, hidden,
                                    ADASKIP_SIMILARITY_EPS, ref_sim.data(), ref_ratio.data()) == ADASKIP_OK);
    const void* valid_ptr = valid_dtype == ADASKIP_DTYPE_F32 ? static_cast<const void*>(valid.data()) : valid16.data();
    status = adaskip_io_similarity_cuda_host(dtype, valid_dtype, in16.data(), out16.data(), valid_ptr, batch, tokens,
                                             hidden, ADASKIP_SIMILARITY_EPS, sim16.data(), ratio16.data());
    CHECK(status == ADASKIP_OK);
    // Accumulation is fp32 either way; the outputs are rounded to the 16-bit type (bf16 keeps 8 bits).
    const double rtol = dtype == ADASKIP_DTYPE_F16 ? 1e-3 : 8e-3;
    for (int64_t b = 0; b < batch; ++b) {
        CHECK_NEAR(fromBits(dtype, sim16[b]), ref_sim[b], 1e-4, rtol, label);
        CHECK_NEAR(fromBits(dtype, ratio16[b]), ref_ratio[b], 1e-4, rtol, label);
    }
    if (status != ADASKIP_OK) std::fprintf(stderr, "  %s\n", adaskip_cuda_last_error());
}

}  // namespace

int main() {
    if (adaskip_cuda_device_count() == 0) {
        std::printf("test_similarity_cuda: skipped, no CUDA device (%s)\n", adaskip_cuda_last_error());
        return kSkip;
    }
    const int64_t shapes[][3] = {{1, 1, 576}, {3, 17, 64}, {2, 5, 577}, {4, 300, 1024}, {2, 3, 8192}, {1, 2, 3}};
    uint32_t seed = 1;
    for (const auto& s : shapes) {
        compareOne(ADASKIP_DTYPE_F32, ADASKIP_DTYPE_F32, s[0], s[1], s[2], seed++);
        compareOne(ADASKIP_DTYPE_F16, ADASKIP_DTYPE_F32, s[0], s[1], s[2], seed++);
        compareOne(ADASKIP_DTYPE_F16, ADASKIP_DTYPE_F16, s[0], s[1], s[2], seed++);
        compareOne(ADASKIP_DTYPE_BF16, ADASKIP_DTYPE_F32, s[0], s[1], s[2], seed++);
        compareOne(ADASKIP_DTYPE_BF16, ADASKIP_DTYPE_BF16, s[0], s[1], s[2], seed++);
    }
    // No tokens: both outputs are 0 without touching the (absent) inputs.
    float sim = -1, ratio = -1;
    CHECK(adaskip_io_similarity_cuda_host(ADASKIP_DTYPE_F32, ADASKIP_DTYPE_F32, nullptr, nullptr, nullptr, 1, 0, 8,
                                          ADASKIP_SIMILARITY_EPS, &sim, &ratio) == ADASKIP_OK);
    CHECK(sim == 0.0f && ratio == 0.0f);
    return adaskip_test::finish("test_similarity_cuda");
}
