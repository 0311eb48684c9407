// Portable 16-lane float vectors (GCC/Clang vector extensions: one AVX-512 register, two AVX2 or four SSE/NEON
// registers, whatever the target has) and the few operations the decode attention kernel needs on them.
#pragma once

#include <cstdint>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace adaskip::ortops {

constexpr int kLanes = 16;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Vec4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));
// the same vector type with 4-byte alignment: loads and stores anywhere in a tensor
typedef float VecFUnaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline VecF load(const float* p) { return *reinterpret_cast<const VecFUnaligned*>(p); }
inline void store(float* p, VecF v) { *reinterpret_cast<VecFUnaligned*>(p) = v; }
inline VecF splat(float x) { return VecF{} + x; }

// float16 caches (--kv-dtype float16): 16 halves widened to one float vector. The compiler's generic conversion
// splits it into 4-lane pieces, so the x86 instructions are named where the target has them.
typedef _Float16 VecH __attribute__((vector_size(kLanes * sizeof(_Float16)), aligned(2)));
inline VecF load(const _Float16* p) {
#if defined(__AVX512F__)
  // the zero-masked form: GCC 12 warns on the plain one's undefined pass-through register
  return (VecF)_mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const Vec8 lo = (Vec8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const Vec8 hi = (Vec8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return __builtin_convertvector(*reinterpret_cast<const VecH*>(p), VecF);
#endif
}

// n values converted between float32 and float16 (round to nearest even), in bulk: the prompt path's copies
inline void widen(const _Float16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void narrow(const float* src, _Float16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<_Float16>(src[i]);
}

// halves added pairwise (a tree, not the lanes in order: 4 dependent adds instead of 15)
inline float reduce_add(VecF v) {
  Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  Vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float reduce_max(VecF v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for x <= 0 (softmax after subtracting the max), relative error below 2e-7 down to x = -87 and 0 below:
// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial, 2^n through the exponent bits.
inline VecF exp_nonpositive(VecF x) {
  const VecF lo = splat(-87.0f);
  VecI underflow = x < lo;
  x = x < lo ? lo : x;
  VecF n = x * 1.44269504088896341f + 0.5f;
  VecI ni = __builtin_convertvector(n, VecI);
  ni -= (__builtin_convertvector(ni, VecF) > n) & 1;  // floor (conversion truncates toward zero)
  n = __builtin_convertvector(ni, VecF);
  VecF r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts: exact product with the first
  VecF p = splat(1.f / 720);
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  VecI bits = (ni + 127) << 23;
  VecF scale = (VecF)bits;  // a vector cast between equal sizes reinterprets the bits
  VecF y = p * scale;
  return underflow ? VecF{} : y;
}

}  // namespace adaskip::ortops
