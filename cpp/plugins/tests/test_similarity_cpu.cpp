// CPU IOSimilarity on hand-computed cases: masked tokens, zero vectors, fractional weights, batch > 1, empty
// shapes, fp16/bf16 inputs, the scalar conversions and argument errors.
#include <cmath>
#include <cstdint>
#include <vector>

#include "adaskip/similarity.h"
#include "check.h"

namespace {

constexpr double kTol = 1e-6;
const double kEps = static_cast<double>(ADASKIP_SIMILARITY_EPS);

struct Result {
    int status;
    std::vector<float> similarity, norm_ratio;
};

Result runF32(const std::vector<float>& h_in, const std::vector<float>& h_out, const std::vector<float>& valid,
              int64_t batch, int64_t tokens, int64_t hidden) {
    Result r{0, std::vector<float>(batch, -7.0f), std::vector<float>(batch, -7.0f)};
    r.status = adaskip::ioSimilarityCpu(adaskip::DType::kF32, h_in.data(), h_out.data(), valid.data(), batch, tokens,
                                        hidden, r.similarity.data(), r.norm_ratio.data());
    return r;
}

std::vector<uint16_t> convert(const std::vector<float>& x, uint16_t (*to)(float)) {
    std::vector<uint16_t> out;
    for (float v : x) out.push_back(to(v));
    return out;
}

// Three rows of three 2-d tokens; expected values worked out by hand in the comments.
const std::vector<float> kIn = {
    1, 0, 1, 0, 1, 1,  // row 0
    3, 4, 0, 0, 1, 0,  // row 1
    1, 2, 1, 2, 1, 2,  // row 2
};
const std::vector<float> kOut = {
    1, 0, -2, 0, 5, -5,  // row 0: cos 1, cos -1, (masked) cos 0
    6, 8, 1, 2, 0, 1,    // row 1: cos 1, zero h_in -> cos 0, orthogonal -> cos 0
    3, 4, 3, 4, 3, 4,    // row 2: all masked
};
const std::vector<float> kValid = {1, 1, 0, 1, 1, 1, 0, 0, 0};
const double kExpectSim[] = {0.0, 1.0 / 3.0, 0.0};
// sqrt(sum valid |out|^2 / sum valid |in|^2): row 0 (1+4)/(1+1); row 1 (100+5+1)/(25+0+1); row 2 0/eps.
const double kExpectRatio[] = {std::sqrt(5.0 / 2.0), std::sqrt(106.0 / 26.0), 0.0};

void testHandComputedBatch() {
    const Result r = runF32(kIn, kOut, kValid, 3, 3, 2);
    CHECK(r.status == ADASKIP_OK);
    for (int b = 0; b < 3; ++b) {
        CHECK_NEAR(r.similarity[b], kExpectSim[b], kTol, 0, "similarity (batch of 3, masks, zero vector)");
        CHECK_NEAR(r.norm_ratio[b], kExpectRatio[b], kTol, 0, "norm_ratio (batch of 3, masks, zero vector)");
    }
}

void testHalfAndBfloatInputs() {
    // Every value above is exact in fp16 and bf16, so both must give the fp32 results.
    struct Case {
        adaskip::DType dtype;
        uint16_t (*to)(float);
        const char* name;
    } cases[] = {{adaskip::DType::kF16, adaskip_f32_to_f16, "fp16"}, {adaskip::DType::kBF16, adaskip_f32_to_bf16, "bf16"}};
    for (const Case& c : cases) {
        const std::vector<uint16_t> in = convert(kIn, c.to), out = convert(kOut, c.to);
        std::vector<float> sim(3), ratio(3);
        CHECK(adaskip::ioSimilarityCpu(c.dtype, in.data(), out.data(), kValid.data(), 3, 3, 2, sim.data(),
                                       ratio.data()) == ADASKIP_OK);
        for (int b = 0; b < 3; ++b) {
            CHECK_NEAR(sim[b], kExpectSim[b], kTol, 0, c.name);
            CHECK_NEAR(ratio[b], kExpectRatio[b], kTol, 0, c.name);
        }
    }
}

void testFractionalWeights() {
    // valid is a weight, as in the ONNX body: cos 1 (weight .5) and cos -1 (weight 1).
    const Result r = runF32({2, 1}, {2, -3}, {0.5f, 1.0f}, 1, 2, 1);
    CHECK(r.status == ADASKIP_OK);
    CHECK_NEAR(r.similarity[0], (0.5 - 1.0) / 1.5, kTol, 0, "weighted similarity");
    CHECK_NEAR(r.norm_ratio[0], std::sqrt((0.5 * 4 + 9) / (0.5 * 4 + 1)), kTol, 0, "weighted norm_ratio");
}

void testZeroVectors() {
    Result r = runF32({0, 0, 0}, {0, 0, 0}, {1}, 1, 1, 3);
    CHECK(r.status == ADASKIP_OK);
    CHECK_NEAR(r.similarity[0], 0.0, kTol, 0, "both zero: similarity");
    CHECK_NEAR(r.norm_ratio[0], 0.0, kTol, 0, "both zero: norm_ratio");

    r = runF32({0, 0}, {1, 2}, {1}, 1, 1, 2);  // eps guards both divisions
    CHECK_NEAR(r.similarity[0], 0.0, kTol, 0, "zero h_in: similarity");
    CHECK_NEAR(r.norm_ratio[0], std::sqrt(5.0 / kEps), 0, 1e-6, "zero h_in: norm_ratio = sqrt(|out|^2 / eps)");
}

void testEmptyShapes() {
    Result r = runF32({}, {}, {}, 2, 0, 4);  // no tokens: count clamps to 1
    CHECK(r.status == ADASKIP_OK);
    for (int b = 0; b < 2; ++b) {
        CHECK_NEAR(r.similarity[b], 0.0, 0, 0, "no tokens: similarity");
        CHECK_NEAR(r.norm_ratio[b], 0.0, 0, 0, "no tokens: norm_ratio");
    }
    r = runF32({}, {}, {1, 1}, 1, 2, 0);  // hidden 0: every token is a zero vector
    CHECK(r.status == ADASKIP_OK);
    CHECK_NEAR(r.similarity[0], 0.0, 0, 0, "hidden 0: similarity");
    CHECK_NEAR(r.norm_ratio[0], 0.0, 0, 0, "hidden 0: norm_ratio");
    CHECK(adaskip_io_similarity_cpu(ADASKIP_DTYPE_F32, nullptr, nullptr, nullptr, 0, 5, 5, ADASKIP_SIMILARITY_EPS,
                                    nullptr, nullptr) == ADASKIP_OK);
}

void testScaling() {
    // Scaling h_out by 3 keeps every cosine and triples the norm ratio; long rows exercise accumulation.
    const int64_t tokens = 4, hidden = 1000;
    std::vector<float> in(tokens * hidden), out(tokens * hidden), out3(tokens * hidden);
    for (int64_t i = 0; i < tokens * hidden; ++i) {
        in[i] = std::sin(0.37f * static_cast<float>(i)) + 0.1f;
        out[i] = std::cos(0.11f * static_cast<float>(i)) * 0.5f + in[i];
        out3[i] = 3.0f * out[i];
    }
    const std::vector<float> valid = {1, 0, 1, 1};
    const Result a = runF32(in, out, valid, 1, tokens, hidden), b = runF32(in, out3, valid, 1, tokens, hidden);
    CHECK(a.status == ADASKIP_OK && b.status == ADASKIP_OK);
    CHECK(a.similarity[0] > 0.5f && a.similarity[0] < 1.0f);
    CHECK_NEAR(b.similarity[0], a.similarity[0], kTol, 0, "similarity is scale invariant");
    CHECK_NEAR(b.norm_ratio[0], 3.0 * a.norm_ratio[0], 0, 1e-6, "norm_ratio scales linearly");
}

void testConversions() {
    CHECK(adaskip_f32_to_f16(1.0f) == 0x3C00);
    CHECK(adaskip_f32_to_f16(-2.0f) == 0xC000);
    CHECK(adaskip_f32_to_f16(65504.0f) == 0x7BFF);
    CHECK(adaskip_f32_to_f16(65519.0f) == 0x7BFF);
    CHECK(adaskip_f32_to_f16(65520.0f) == 0x7C00);            // rounds to infinity
    CHECK(adaskip_f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
    CHECK(adaskip_f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);  // tie -> even (zero)
    CHECK(adaskip_f32_to_f16(std::ldexp(3.0f, -26)) == 0x0001);  // 0.75 ulp -> 1 ulp
    CHECK(adaskip_f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);         // tie -> even
    CHECK(adaskip_f32_to_f16(1.0f + std::ldexp(3.0f, -11)) == 0x3C02);         // tie -> even (up)
    CHECK((adaskip_f32_to_f16(NAN) & 0x7C00) == 0x7C00 && (adaskip_f32_to_f16(NAN) & 0x03FF) != 0);
    CHECK(adaskip_f16_to_f32(0x3555) == 0.333251953125f);
    CHECK(adaskip_f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
    CHECK(adaskip_f16_to_f32(0x8000) == 0.0f && std::signbit(adaskip_f16_to_f32(0x8000)));
    CHECK(std::isinf(adaskip_f16_to_f32(0xFC00)) && adaskip_f16_to_f32(0xFC00) < 0);
    for (uint32_t h = 0; h < 0x10000u; ++h) {  // every finite half survives the round trip
        const auto bits = static_cast<uint16_t>(h);
        if ((bits & 0x7C00) == 0x7C00) continue;
        if (adaskip_f32_to_f16(adaskip_f16_to_f32(bits)) != bits) {
            CHECK(!"f16 round trip");
            break;
        }
    }
    CHECK(adaskip_f32_to_bf16(1.0f) == 0x3F80);
    CHECK(adaskip_f32_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);  // tie -> even
    CHECK(adaskip_f32_to_bf16(1.0f + std::ldexp(3.0f, -8)) == 0x3F82);  // tie -> even (up)
    CHECK(adaskip_bf16_to_f32(0xC040) == -3.0f);
    CHECK(std::isnan(adaskip_bf16_to_f32(adaskip_f32_to_bf16(NAN))));
}

void testErrors() {
    float sim = 0, ratio = 0;
    const float x[2] = {1, 2}, v[1] = {1};
    CHECK(adaskip_io_similarity_cpu(ADASKIP_DTYPE_F32, nullptr, x, v, 1, 1, 2, 1e-12f, &sim, &ratio) ==
          ADASKIP_ERR_INVALID_ARGUMENT);
    CHECK(adaskip_io_similarity_cpu(ADASKIP_DTYPE_F32, x, x, nullptr, 1, 1, 2, 1e-12f, &sim, &ratio) ==
          ADASKIP_ERR_INVALID_ARGUMENT);
    CHECK(adaskip_io_similarity_cpu(ADASKIP_DTYPE_F32, x, x, v, 1, 1, 2, 1e-12f, nullptr, &ratio) ==
          ADASKIP_ERR_INVALID_ARGUMENT);
    CHECK(adaskip_io_similarity_cpu(ADASKIP_DTYPE_F32, x, x, v, -1, 1, 2, 1e-12f, &sim, &ratio) ==
          ADASKIP_ERR_INVALID_ARGUMENT);
    CHECK(adaskip_io_similarity_cpu(ADASKIP_DTYPE_F32, x, x, v, INT64_MAX, 2, 2, 1e-12f, &sim, &ratio) ==
          ADASKIP_ERR_INVALID_ARGUMENT);
    CHECK(adaskip_io_similarity_cpu(ADASKIP_DTYPE_F32, x, x, v, 1, 1, 2, NAN, &sim, &ratio) ==
          ADASKIP_ERR_INVALID_ARGUMENT);
    CHECK(adaskip_io_similarity_cpu(7, x, x, v, 1, 1, 2, 1e-12f, &sim, &ratio) == ADASKIP_ERR_UNSUPPORTED_DTYPE);
    CHECK(adaskip_status_string(ADASKIP_ERR_UNSUPPORTED_DTYPE)[0] != '\0');
}

}  // namespace

int main() {
    testHandComputedBatch();
    testHalfAndBfloatInputs();
    testFractionalWeights();
    testZeroVectors();
    testEmptyShapes();
    testScaling();
    testConversions();
    testErrors();
    return adaskip_test::finish("test_similarity_cpu");
}
