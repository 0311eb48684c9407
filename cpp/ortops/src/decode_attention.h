// Decode attention over a BNSH KV cache: one new query token per row, each KV head's cache read once for all the
// query heads of its group (ONNX Runtime 1.32's CPU GroupQueryAttention reads it once per query head).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace adaskip::ortops {

struct DecodeAttentionShape {
  int64_t batch;
  int64_t num_heads;     // query heads
  int64_t kv_heads;      // num_heads is a multiple of it
  int64_t head_dim;      // a multiple of 16 (kLanes)
  int64_t capacity;      // positions per row and head in the cache buffers
  int64_t window;        // > 0: a query sees only the last `window` keys, itself included; else every key
  float scale;           // applied to q.k
};

// Runs fn(i) for every i in [0, total), possibly in parallel; returns when all are done.
using ParallelFor = std::function<void(size_t total, const std::function<void(size_t)>& fn)>;

// out[b, h, :] = softmax(scale * q[b, h] . K[b, g, :len_b]) V[b, g, :len_b] with g = h / (num_heads / kv_heads),
// over the keys the window lets the query (position len_b - 1) see. q, out: [batch, num_heads, head_dim];
// k_cache, v_cache: [batch, kv_heads, capacity, head_dim] of float or _Float16 (--kv-dtype float16: half the bytes
// read, widened to float in registers; the math stays float32); lengths[b] in [1, capacity].
template <typename Cache>
void decode_attention(const DecodeAttentionShape& shape, const float* q, const Cache* k_cache, const Cache* v_cache,
                      const int64_t* lengths, float* out, const ParallelFor& parallel_for);

// Rotary embedding in place on `heads` vectors of head_dim at one position: the first 2 * half dimensions rotated
// as two halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with cos/sin rows of `half` values.
void rotate_half(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin, int64_t half);

}  // namespace adaskip::ortops
