// CPU reference of IOSimilarity (see include/adaskip/similarity.h for the rule).
//
// Everything is accumulated in double: it is the reference the CUDA kernel and the TensorRT plugin are checked
// against, so it should be more accurate than any of them rather than fast.
#include "adaskip/similarity.h"

#include <cmath>
#include <cstring>

namespace {

float bitsToFloat(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint32_t floatToBits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

struct LoadF32 {
    static double load(const void* base, int64_t i) { return static_cast<const float*>(base)[i]; }
};
struct LoadF16 {
    static double load(const void* base, int64_t i) { return adaskip_f16_to_f32(static_cast<const uint16_t*>(base)[i]); }
};
struct LoadBF16 {
    static double load(const void* base, int64_t i) {
        return adaskip_bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    }
};

// Overflow-checked product of non-negative dimensions.
bool checkedMul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

template <typename Load>
void run(const void* h_in, const void* h_out, const float* valid, int64_t batch, int64_t tokens, int64_t hidden,
         double eps, float* similarity, float* norm_ratio) {
    for (int64_t b = 0; b < batch; ++b) {
        double cos_sum = 0.0, count = 0.0, in_sum = 0.0, out_sum = 0.0;
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t base = (b * tokens + t) * hidden;
            double dot = 0.0, n_in = 0.0, n_out = 0.0;
            for (int64_t d = 0; d < hidden; ++d) {
                const double x = Load::load(h_in, base + d);
                const double y = Load::load(h_out, base + d);
                dot += x * y;
                n_in += x * x;
                n_out += y * y;
            }
            // sqrt of each norm, then the product: the order the ONNX body and torch use (no overflow of n_in*n_out).
            const double cos = dot / std::fmax(std::sqrt(n_in) * std::sqrt(n_out), eps);
            const double w = valid[b * tokens + t];
            cos_sum += cos * w;
            count += w;
            in_sum += n_in * w;
            out_sum += n_out * w;
        }
        similarity[b] = static_cast<float>(cos_sum / std::fmax(count, 1.0));
        norm_ratio[b] = static_cast<float>(std::sqrt(out_sum / std::fmax(in_sum, eps)));
    }
}

}  // namespace

extern "C" {

const char* adaskip_status_string(int status) {
    switch (status) {
        case ADASKIP_OK: return "ok";
        case ADASKIP_ERR_INVALID_ARGUMENT: return "invalid argument (null pointer or bad dimension)";
        case ADASKIP_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype (expected f32, f16 or bf16)";
        case ADASKIP_ERR_CUDA: return "CUDA runtime error";
        default: return "unknown status";
    }
}

float adaskip_f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t man = h & 0x3FFu;
    if (exp == 0) {
        // Zero or subnormal: man * 2^-24 is exact in float.
        const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
        return sign ? -mag : mag;
    }
    if (exp == 31) return bitsToFloat(sign | 0x7F800000u | (man << 13));  // inf / nan (payload kept)
    return bitsToFloat(sign | ((exp + 112u) << 23) | (man << 13));
}

float adaskip_bf16_to_f32(uint16_t bits) { return bitsToFloat(static_cast<uint32_t>(bits) << 16); }

uint16_t adaskip_f32_to_f16(float value) {
    const uint32_t x = floatToBits(value);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t mag = x & 0x7FFFFFFFu;
    if (mag >= 0x7F800000u) return static_cast<uint16_t>(sign | (mag > 0x7F800000u ? 0x7E00u : 0x7C00u));
    if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to infinity
    if (mag < 0x38800000u) {                                                 // below the smallest normal half
        if (mag <= 0x33000000u) return static_cast<uint16_t>(sign);          // <= 2^-25 rounds to (signed) zero
        const uint32_t exp = mag >> 23;
        const uint32_t man = (mag & 0x7FFFFFu) | 0x800000u;
        const uint32_t shift = 126u - exp;  // result in units of 2^-24
        uint32_t r = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) ++r;
        return static_cast<uint16_t>(sign | r);
    }
    uint32_t r = (mag >> 13) - (112u << 10);  // rebias the exponent, keep the top 10 mantissa bits
    const uint32_t rem = mag & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is the right result
    return static_cast<uint16_t>(sign | r);
}

uint16_t adaskip_f32_to_bf16(float value) {
    const uint32_t x = floatToBits(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
    return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

int adaskip_io_similarity_cpu(int dtype, const void* h_in, const void* h_out, const float* valid, int64_t batch,
                              int64_t tokens, int64_t hidden, float eps, float* similarity, float* norm_ratio) {
    if (batch < 0 || tokens < 0 || hidden < 0) return ADASKIP_ERR_INVALID_ARGUMENT;
    int64_t n_tokens = 0, n_elems = 0;
    if (!checkedMul(batch, tokens, &n_tokens) || !checkedMul(n_tokens, hidden, &n_elems)) {
        return ADASKIP_ERR_INVALID_ARGUMENT;
    }
    if (dtype != ADASKIP_DTYPE_F32 && dtype != ADASKIP_DTYPE_F16 && dtype != ADASKIP_DTYPE_BF16) {
        return ADASKIP_ERR_UNSUPPORTED_DTYPE;
    }
    if (batch > 0 && (!similarity || !norm_ratio)) return ADASKIP_ERR_INVALID_ARGUMENT;
    if (n_tokens > 0 && !valid) return ADASKIP_ERR_INVALID_ARGUMENT;
    if (n_elems > 0 && (!h_in || !h_out)) return ADASKIP_ERR_INVALID_ARGUMENT;
    if (!(eps >= 0.0f)) return ADASKIP_ERR_INVALID_ARGUMENT;  // also rejects NaN

    switch (dtype) {
        case ADASKIP_DTYPE_F32:
            run<LoadF32>(h_in, h_out, valid, batch, tokens, hidden, eps, similarity, norm_ratio);
            break;
        case ADASKIP_DTYPE_F16:
            run<LoadF16>(h_in, h_out, valid, batch, tokens, hidden, eps, similarity, norm_ratio);
            break;
        default:
            run<LoadBF16>(h_in, h_out, valid, batch, tokens, hidden, eps, similarity, norm_ratio);
            break;
    }
    return ADASKIP_OK;
}

}  // extern "C"
