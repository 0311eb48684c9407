#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "vector_math.h"

namespace adaskip::ortops {
namespace {

// Keys per task: a (row, KV head) pair's keys are split into chunks (flash-decoding) so that a single long row, or
// a model with one KV head, still keeps every thread busy; partial results are merged by their softmax maxima.
constexpr int64_t kChunk = 256;

struct Task {
  int64_t b, g, begin, end;
};

// Softmax numerators of one query head's scores in place: returns (max, sum of exp(s - max)).
std::pair<float, float> exponentiate(float* scores, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, scores[i]);
  VecF sum{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    VecF p = exp_nonpositive(load(scores + i) - mx);
    store(scores + i, p);
    sum += p;
  }
  float total = reduce_add(sum);
  if (i < n) {  // the last partial vector through a padded copy
    float buf[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) buf[k] = i + k < n ? scores[i + k] - mx : -100.f;
    store(buf, exp_nonpositive(load(buf)));
    for (int64_t k = 0; i + k < n; ++k) {
      scores[i + k] = buf[k];
      total += buf[k];
    }
  }
  return {mx, total};
}

// One task's partial softmax for the group's query heads, written to `partial` as G maxima, G sums of exp(s - max)
// and G x head_dim sums of exp(s - max) V. G (query heads per KV head) and V (vectors per head) are compile-time
// constants for the common shapes (queries and accumulators stay in registers), 0 for the generic path.
template <typename Cache, int kG, int kV>
void attend_chunk(const DecodeAttentionShape& s, const float* q, const Cache* k_cache, const Cache* v_cache,
                  const Task& t, float* partial) {
  const int64_t group = kG ? kG : s.num_heads / s.kv_heads, dim = s.head_dim;
  const int64_t vecs = kV ? kV : dim / kLanes, n = t.end - t.begin;
  const Cache* keys = k_cache + ((t.b * s.kv_heads + t.g) * s.capacity + t.begin) * dim;
  const Cache* values = v_cache + ((t.b * s.kv_heads + t.g) * s.capacity + t.begin) * dim;
  const float* queries = q + (t.b * s.num_heads + t.g * group) * dim;
  thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(group * kChunk));

  // scores: each key row is loaded once and multiplied with every query head of the group
  if constexpr (kG > 0 && kV > 0) {
    VecF qs[kG][kV];
    for (int j = 0; j < kG; ++j)
      for (int v = 0; v < kV; ++v) qs[j][v] = load(queries + j * dim + v * kLanes) * s.scale;
    for (int64_t i = 0; i < n; ++i) {
      const Cache* key = keys + i * dim;
      VecF kv[kV];
      for (int v = 0; v < kV; ++v) kv[v] = load(key + v * kLanes);
      for (int j = 0; j < kG; ++j) {
        VecF acc = qs[j][0] * kv[0];
        for (int v = 1; v < kV; ++v) acc += qs[j][v] * kv[v];
        scores[j * kChunk + i] = reduce_add(acc);
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const Cache* key = keys + i * dim;
      for (int64_t j = 0; j < group; ++j) {
        const float* qj = queries + j * dim;
        VecF acc = load(qj) * load(key);
        for (int64_t v = 1; v < vecs; ++v) acc += load(qj + v * kLanes) * load(key + v * kLanes);
        scores[j * kChunk + i] = reduce_add(acc) * s.scale;
      }
    }
  }
  float* m = partial;
  float* l = partial + group;
  float* out = partial + 2 * group;
  for (int64_t j = 0; j < group; ++j) std::tie(m[j], l[j]) = exponentiate(scores.data() + j * kChunk, n);
  // weighted values: each value row is loaded once for every query head of the group
  if constexpr (kG > 0 && kV > 0) {
    VecF acc[kG][kV] = {};
    for (int64_t i = 0; i < n; ++i) {
      const Cache* value = values + i * dim;
      for (int v = 0; v < kV; ++v) {
        const VecF vv = load(value + v * kLanes);
        for (int j = 0; j < kG; ++j) acc[j][v] += scores[j * kChunk + i] * vv;
      }
    }
    for (int j = 0; j < kG; ++j)
      for (int v = 0; v < kV; ++v) store(out + j * dim + v * kLanes, acc[j][v]);
  } else {
    std::fill(out, out + group * dim, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const Cache* value = values + i * dim;
      for (int64_t v = 0; v < vecs; ++v) {
        const VecF vv = load(value + v * kLanes);
        for (int64_t j = 0; j < group; ++j) {
          float* aj = out + j * dim + v * kLanes;
          store(aj, load(aj) + scores[j * kChunk + i] * vv);
        }
      }
    }
  }
}

template <typename Cache>
using ChunkFn = void (*)(const DecodeAttentionShape&, const float*, const Cache*, const Cache*, const Task&, float*);

template <typename Cache, int kG>
ChunkFn<Cache> chunk_fn_for_dim(int64_t vecs) {
  switch (vecs) {
    case 4: return attend_chunk<Cache, kG, 4>;    // head size 64
    case 8: return attend_chunk<Cache, kG, 8>;    // 128
    case 16: return attend_chunk<Cache, kG, 16>;  // 256
    default: return attend_chunk<Cache, 0, 0>;
  }
}

template <typename Cache>
ChunkFn<Cache> chunk_fn(int64_t group, int64_t vecs) {
  switch (group) {
    case 1: return chunk_fn_for_dim<Cache, 1>(vecs);
    case 2: return chunk_fn_for_dim<Cache, 2>(vecs);
    case 3: return chunk_fn_for_dim<Cache, 3>(vecs);
    case 4: return chunk_fn_for_dim<Cache, 4>(vecs);
    case 5: return chunk_fn_for_dim<Cache, 5>(vecs);
    case 6: return chunk_fn_for_dim<Cache, 6>(vecs);
    case 7: return chunk_fn_for_dim<Cache, 7>(vecs);
    case 8: return chunk_fn_for_dim<Cache, 8>(vecs);
    default: return attend_chunk<Cache, 0, 0>;
  }
}

}  // namespace

template <typename Cache>
void decode_attention(const DecodeAttentionShape& s, const float* q, const Cache* k_cache, const Cache* v_cache,
                      const int64_t* lengths, float* out, const ParallelFor& parallel_for) {
  const int64_t group = s.num_heads / s.kv_heads, dim = s.head_dim;
  std::vector<Task> tasks;
  std::vector<size_t> first_task;  // per (row, KV head): its first task
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t len = lengths[b];
    const int64_t begin = s.window > 0 ? std::max<int64_t>(0, len - s.window) : 0;
    for (int64_t g = 0; g < s.kv_heads; ++g) {
      first_task.push_back(tasks.size());
      for (int64_t c = begin; c < len; c += kChunk) tasks.push_back({b, g, c, std::min(len, c + kChunk)});
    }
  }
  first_task.push_back(tasks.size());
  const size_t stride = static_cast<size_t>(group * (dim + 2));
  std::vector<float> partial(tasks.size() * stride);
  const ChunkFn<Cache> attend = chunk_fn<Cache>(group, dim / kLanes);
  parallel_for(tasks.size(), [&](size_t i) { attend(s, q, k_cache, v_cache, tasks[i], &partial[i * stride]); });

  // merge each (row, KV head)'s chunks: rescale by exp(m_chunk - m_max)
  for (size_t pair = 0; pair + 1 < first_task.size(); ++pair) {
    const size_t t0 = first_task[pair], t1 = first_task[pair + 1];
    const int64_t b = tasks[t0].b, g = tasks[t0].g;
    for (int64_t j = 0; j < group; ++j) {
      float mx = -std::numeric_limits<float>::infinity();
      for (size_t t = t0; t < t1; ++t) mx = std::max(mx, partial[t * stride + j]);
      float* o = out + (b * s.num_heads + g * group + j) * dim;
      std::fill(o, o + dim, 0.f);
      float total = 0.f;
      for (size_t t = t0; t < t1; ++t) {
        const float* p = &partial[t * stride];
        const float w = std::exp(p[j] - mx);
        total += w * p[group + j];
        const float* acc = p + 2 * group + j * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * acc[d];
      }
      for (int64_t d = 0; d < dim; ++d) o[d] /= total;
    }
  }
}

template void decode_attention<float>(const DecodeAttentionShape&, const float*, const float*, const float*,
                                      const int64_t*, float*, const ParallelFor&);
template void decode_attention<_Float16>(const DecodeAttentionShape&, const float*, const _Float16*,
                                         const _Float16*, const int64_t*, float*, const ParallelFor&);

void rotate_half(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin, int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * cos[i] - x2 * sin[i];
      v[i + half] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

}  // namespace adaskip::ortops
