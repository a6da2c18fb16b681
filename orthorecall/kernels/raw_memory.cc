// The raw-read mLSTM memory for XLA:CPU: the whole sequence of one (batch, head) pair
// per task, step by step, and its VJP.
//
// With the raw read, h_t = C_tᵀq_t / (max(|q_t·n_t|, e^{-m_t}) + 1e-6) needs no C_t but
// its product with q_t, and the chunkwise form (L x L decay matrices) does 2-3x the
// recurrence's arithmetic to expose matrix products, which XLA:CPU then runs on small
// batches far below the machine's speed. Here the recurrence runs as written: each step
// updates C (d x d, in L1) and reads it in one pass over its rows, in the (B, T, H, d)
// layout the model produces (no transposes), the (batch, head) pairs split over XLA's
// intra-op threads.
//
// Semantics are ``orthorecall.mlstm.chunkwise_sequence``'s (see orthorecall/chunkwise.py):
// the arithmetic runs on sanitized values (a NaN or inf input replaced by 0; ĩ = -inf and
// log f = -inf are legitimate and kept), and NaN is put back where the recurrence would
// have it were every bad value a NaN: in h_t, row-wise for a bad q_t, the stabilizer or
// any key feature (or n0) since the segment start, column-wise for a bad value feature
// (or column of C0); in the end state, per entry. A reset clears the state and the flags.
//
// Backward: the forward saves the sanitized state every `interval` steps; the backward
// recomputes one interval's states into a buffer (interval x d x d floats, in L2) and
// runs the adjoint of the sanitized recurrence back through it, with the cotangent of
// every NaN output set to 0 and the cotangents of bad inputs set to 0 (what
// jnp.where-based sanitizing gives in JAX). The maximum's derivative at a tie is split
// in halves, as jnp.maximum's.

#include <algorithm>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <utility>
#include <limits>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using orthorecall::ParallelFor;

namespace {

constexpr float kEps = 1e-6f;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

inline bool NanOrPlusInf(float x) { return !(x < kInf); }
inline float FiniteOrZero(float x) { return std::isfinite(x) ? x : 0.0f; }
// log f: NaN (or +inf) is bad; -inf (f = 0) is kept.
inline float SanitizedLogF(float x) { return (std::isnan(x) || x == kInf) ? 0.0f : x; }
inline float SanitizedInput(float x) { return NanOrPlusInf(x) ? 0.0f : x; }
// Whether all of x[0..d) are finite, by their exponent bits (an integer reduction, which
// vectorizes where a float one would not).
inline bool AllFinite(const float* x, int d) {
  uint32_t any_bad = 0;
  for (int i = 0; i < d; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    any_bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return any_bad == 0;
}
// x itself when all of x[0..d) is finite (the common case, no copy), else a copy in
// `scratch` with the bad entries replaced by 0.
inline const float* Sanitized(const float* x, float* scratch, int d) {
  if (AllFinite(x, d)) return x;
  for (int i = 0; i < d; ++i) scratch[i] = FiniteOrZero(x[i]);
  return scratch;
}
inline float Max(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? kNaN : (a > b ? a : b);
}

// d(max(a, b)) split between a and b as jnp.maximum's JVP does: all to the larger, halves
// at a tie.
inline void MaxCotangent(float a, float b, float bar, float* a_bar, float* b_bar) {
  if (a > b) {
    *a_bar += bar;
  } else if (b > a) {
    *b_bar += bar;
  } else {
    *a_bar += 0.5f * bar;
    *b_bar += 0.5f * bar;
  }
}

struct Shape {
  int64_t batch, length, heads;
  int d;
};

struct Strides {
  // Element (b, t, h, i) of a (B, T, H, d) array.
  Shape s;
  int64_t Vector(int64_t b, int64_t t, int64_t h) const {
    return ((b * s.length + t) * s.heads + h) * s.d;
  }
  int64_t Gate(int64_t b, int64_t t, int64_t h) const { return (b * s.length + t) * s.heads + h; }
  int64_t Reset(int64_t b, int64_t t) const { return b * s.length + t; }
  int64_t Intervals(int interval) const { return (s.length + interval - 1) / interval; }
  // Saved state (b, j, h) of a (B, J, H, ...) array of J intervals.
  int64_t Saved(int64_t b, int64_t j, int64_t h, int interval) const {
    return (b * Intervals(interval) + j) * s.heads + h;
  }
};

// The fault flags of one (batch, head) pair since its segment start.
struct Faults {
  explicit Faults(int d) : key(d), value(d), c0_column(d) {}
  void Clear() {
    stabilizer = any_key = any_value = n0 = any_c0_column = carries = false;
    std::fill(key.begin(), key.end(), 0);
    std::fill(value.begin(), value.end(), 0);
    std::fill(c0_column.begin(), c0_column.end(), 0);
  }
  void FromState(const float* c0, const float* n0_values, float m0, int d) {
    Clear();
    carries = true;
    stabilizer = NanOrPlusInf(m0);
    for (int i = 0; i < d; ++i) n0 = n0 || !std::isfinite(n0_values[i]);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) c0_column[j] |= !std::isfinite(c0[i * d + j]);
    for (int j = 0; j < d; ++j) any_c0_column = any_c0_column || c0_column[j];
  }
  bool stabilizer = false, any_key = false, any_value = false, n0 = false, any_c0_column = false;
  bool carries = false;
  std::vector<char> key, value, c0_column;
};

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
inline Vec LoadVec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreVec(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// What a step's gates and the stabilizer decide, before C is touched.
struct StepGates {
  float alpha, beta, m;
};

inline StepGates Gates(float log_f, float i_pre, float m_prev) {
  const float a = log_f + m_prev;
  const float m = Max(a, i_pre);
  return {std::exp(a - m), std::exp(i_pre - m), m};
}

// U consecutive steps of C_t = α_t C_{t-1} + β_t k_t v_tᵀ and num_t = C_tᵀ q_t in one pass
// over C's rows (read from `from`, the last state written to `to`; they may be the same):
// each row is loaded and stored once for all U steps, and the num_t stay in registers.
// The arithmetic of each entry is the same whatever U. D > 0 (a multiple of the vector
// width): unrolled over whole vectors; D = 0: any width, one step at a time.
template <int D, int U>
struct Pass {
  static void Run(const float* const* q, const float* const* k, const float* const* v,
                  const StepGates* gates, const float* from, float* to, float* const* num,
                  int width) {
    if constexpr (D > 0 && D % kLanes == 0) {
      constexpr int W = D / kLanes;
      Vec acc[U][W];
      for (int u = 0; u < U; ++u)
        for (int w = 0; w < W; ++w) acc[u][w] = Vec{} * 0.0f;
      for (int i = 0; i < D; ++i) {
        Vec row[W];
        for (int w = 0; w < W; ++w) row[w] = LoadVec(from + i * D + w * kLanes);
        for (int u = 0; u < U; ++u) {
          const float bk = gates[u].beta * k[u][i], qi = q[u][i];
          for (int w = 0; w < W; ++w) {
            row[w] = gates[u].alpha * row[w] + bk * LoadVec(v[u] + w * kLanes);
            acc[u][w] += qi * row[w];
          }
        }
        for (int w = 0; w < W; ++w) StoreVec(to + i * D + w * kLanes, row[w]);
      }
      for (int u = 0; u < U; ++u)
        for (int w = 0; w < W; ++w) StoreVec(num[u] + w * kLanes, acc[u][w]);
    } else {
      static_assert(U == 1, "widths that are not whole vectors run one step per pass");
      const int d = D > 0 ? D : width;
      float* __restrict out = num[0];
      for (int j = 0; j < d; ++j) out[j] = 0.0f;
      for (int i = 0; i < d; ++i) {
        const float bk = gates[0].beta * k[0][i], qi = q[0][i];
        for (int j = 0; j < d; ++j) {
          const float updated = gates[0].alpha * from[i * d + j] + bk * v[0][j];
          to[i * d + j] = updated;
          out[j] += qi * updated;
        }
      }
    }
  }
};

// n_t = α n_{t-1} + β k_t in place; returns q_t·n_t.
inline float UpdateNormalizer(const float* q, const float* k, const StepGates& g,
                              const float* from, float* to, int d) {
  float q_dot_n = 0.0f;
  for (int i = 0; i < d; ++i) {
    to[i] = g.alpha * from[i] + g.beta * k[i];
    q_dot_n += q[i] * to[i];
  }
  return q_dot_n;
}

inline float Denominator(float q_dot_n, float m) {
  if (std::isnan(q_dot_n) || std::isnan(m)) return kNaN;
  return std::max(std::fabs(q_dot_n), std::exp(-m)) + kEps;
}

// The most steps one pass takes at width D (the accumulators and a row in registers).
template <int D>
constexpr int MaxPassSteps() {
  return (D > 0 && D % kLanes == 0) ? (D <= 64 ? 4 : 2) : 1;
}

template <int D>
void RunPass(int steps, const float* const* q, const float* const* k, const float* const* v,
             const StepGates* gates, const float* from, float* to, float* const* num, int d) {
  if constexpr (MaxPassSteps<D>() >= 4) {
    if (steps == 4) return Pass<D, 4>::Run(q, k, v, gates, from, to, num, d);
    if (steps == 3) return Pass<D, 3>::Run(q, k, v, gates, from, to, num, d);
  }
  if constexpr (MaxPassSteps<D>() >= 2) {
    if (steps == 2) return Pass<D, 2>::Run(q, k, v, gates, from, to, num, d);
  }
  Pass<D, 1>::Run(q, k, v, gates, from, to, num, d);
}

// The per-step scalars the backward needs.
struct StepResult {
  float alpha, beta, m, q_dot_n, denominator;
};

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::F32>& log_f,
                       const ffi::Buffer<ffi::F32>& i_pre, const ffi::Buffer<ffi::PRED>& reset,
                       const ffi::Buffer<ffi::F32>& c0, const ffi::Buffer<ffi::F32>& n0,
                       const ffi::Buffer<ffi::F32>& m0, Shape* shape) {
  auto dims = q.dimensions();
  const size_t rank = dims.size();
  if (rank < 3 || dims[rank - 1] < 1 || dims[rank - 2] < 1 || dims[rank - 3] < 1)
    return ffi::Error::InvalidArgument("raw_memory: q must be (..., time, heads, d), none empty");
  const int64_t per_batch = dims[rank - 3] * dims[rank - 2] * dims[rank - 1];
  *shape = {q.element_count() / per_batch, dims[rank - 3], dims[rank - 2],
            static_cast<int>(dims[rank - 1])};
  const int64_t tokens = shape->batch * shape->length * shape->heads;
  const int64_t pairs = shape->batch * shape->heads, d = shape->d;
  if (k.element_count() != tokens * d || v.element_count() != tokens * d ||
      log_f.element_count() != tokens || i_pre.element_count() != tokens ||
      reset.element_count() != shape->batch * shape->length || c0.element_count() != pairs * d * d ||
      n0.element_count() != pairs * d || m0.element_count() != pairs)
    return ffi::Error::InvalidArgument(
        "raw_memory: operands must be q, k, v (B, T, H, d), log f, ĩ (B, T, H), reset (B, T), "
        "C0 (B, H, d, d), n0 (B, H, d), m0 (B, H)");
  return ffi::Error::Success();
}

// The operands of both directions, as raw pointers.
struct Operands {
  const float *q, *k, *v, *log_f, *i_pre, *c0, *n0, *m0;
  const bool* reset;
};

Operands Pointers(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                  ffi::Buffer<ffi::F32>& log_f, ffi::Buffer<ffi::F32>& i_pre,
                  ffi::Buffer<ffi::PRED>& reset, ffi::Buffer<ffi::F32>& c0,
                  ffi::Buffer<ffi::F32>& n0, ffi::Buffer<ffi::F32>& m0) {
  return {q.typed_data(),  k.typed_data(),  v.typed_data(),  log_f.typed_data(),
          i_pre.typed_data(), c0.typed_data(), n0.typed_data(), m0.typed_data(),
          reset.typed_data()};
}

struct ForwardResults {
  float *h, *c_end, *n_end, *m_end, *saved_c, *saved_n, *saved_m;
};

template <int D>
void ForwardPairs(const Shape& shape, const Operands& in, const ForwardResults& out,
                  int64_t interval, int64_t begin, int64_t end) {
  const Strides at{shape};
  const int d = D > 0 ? D : shape.d;
  constexpr int kMaxSteps = MaxPassSteps<D>();
  const bool save = interval > 0;  // 0: nothing saved (a forward without backward)
  std::vector<float> c(d * d), n(d), inputs(3 * kMaxSteps * d), nums(kMaxSteps * d);
  std::vector<char> column_bad(kMaxSteps * d);
  Faults faults(d);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / shape.heads, hd = pair % shape.heads;
    const float* c0 = in.c0 + pair * d * d;
    const float* n0 = in.n0 + pair * d;
    for (int i = 0; i < d * d; ++i) c[i] = FiniteOrZero(c0[i]);
    for (int i = 0; i < d; ++i) n[i] = FiniteOrZero(n0[i]);
    float m = SanitizedInput(in.m0[pair]);
    faults.FromState(c0, n0, in.m0[pair], d);
    for (int64_t t = 0; t < shape.length;) {
      if (save && t % interval == 0) {
        const int64_t slot = at.Saved(b, t / interval, hd, interval);
        std::memcpy(out.saved_c + slot * d * d, c.data(), sizeof(float) * d * d);
        std::memcpy(out.saved_n + slot * d, n.data(), sizeof(float) * d);
        out.saved_m[slot] = m;
      }
      if (in.reset[at.Reset(b, t)]) {
        std::fill(c.begin(), c.end(), 0.0f);
        std::fill(n.begin(), n.end(), 0.0f);
        m = 0.0f;
        faults.Clear();
      }
      // The steps one pass takes: up to the next reset or saved state.
      int steps = 1;
      while (steps < kMaxSteps && t + steps < shape.length && !in.reset[at.Reset(b, t + steps)] &&
             !(save && (t + steps) % interval == 0))
        ++steps;
      const float *q[kMaxSteps], *k[kMaxSteps], *v[kMaxSteps];
      float* num[kMaxSteps];
      StepGates gates[kMaxSteps];
      bool bad_row[kMaxSteps], bad_columns[kMaxSteps];
      for (int u = 0; u < steps; ++u) {
        const int64_t x = at.Vector(b, t + u, hd), g = at.Gate(b, t + u, hd);
        const float *qx = in.q + x, *kx = in.k + x, *vx = in.v + x;
        float* scratch = inputs.data() + 3 * u * d;
        q[u] = Sanitized(qx, scratch, d);
        k[u] = Sanitized(kx, scratch + d, d);
        v[u] = Sanitized(vx, scratch + 2 * d, d);
        const bool bad_query = q[u] != qx;
        if (k[u] != kx || v[u] != vx) {
          // The faults of every feature.
          for (int i = 0; i < d; ++i) {
            const bool bad_key = !std::isfinite(kx[i]), bad_value = !std::isfinite(vx[i]);
            faults.key[i] |= bad_key;
            faults.any_key |= bad_key;
            faults.value[i] |= bad_value;
            faults.any_value |= bad_value;
          }
        }
        faults.stabilizer |= std::isnan(in.log_f[g]) || NanOrPlusInf(in.i_pre[g]);
        bad_row[u] =
            bad_query || faults.stabilizer || faults.any_key || (faults.carries && faults.n0);
        bad_columns[u] = faults.any_value || (faults.carries && faults.any_c0_column);
        if (bad_columns[u])
          for (int j = 0; j < d; ++j)
            column_bad[u * d + j] = faults.value[j] || (faults.carries && faults.c0_column[j]);
        gates[u] = Gates(SanitizedLogF(in.log_f[g]), SanitizedInput(in.i_pre[g]), m);
        m = gates[u].m;
        num[u] = nums.data() + u * d;
      }
      RunPass<D>(steps, q, k, v, gates, c.data(), c.data(), num, d);
      for (int u = 0; u < steps; ++u) {
        const float q_dot_n = UpdateNormalizer(q[u], k[u], gates[u], n.data(), n.data(), d);
        const float denominator = Denominator(q_dot_n, gates[u].m);
        float* h = out.h + at.Vector(b, t + u, hd);
        if (bad_row[u]) {
          std::fill(h, h + d, kNaN);
        } else if (bad_columns[u]) {
          for (int j = 0; j < d; ++j) h[j] = column_bad[u * d + j] ? kNaN : num[u][j] / denominator;
        } else {
          for (int j = 0; j < d; ++j) h[j] = num[u][j] / denominator;
        }
      }
      t += steps;
    }
    // The end state, NaN per entry where the recurrence's would be.
    float* c_end = out.c_end + pair * d * d;
    float* n_end = out.n_end + pair * d;
    for (int i = 0; i < d; ++i) {
      const bool bad_row = faults.stabilizer || faults.key[i];
      for (int j = 0; j < d; ++j) {
        const bool bad =
            bad_row || faults.value[j] || (faults.carries && !std::isfinite(c0[i * d + j]));
        c_end[i * d + j] = bad ? kNaN : c[i * d + j];
      }
      n_end[i] = (bad_row || (faults.carries && !std::isfinite(n0[i]))) ? kNaN : n[i];
    }
    out.m_end[pair] = faults.stabilizer ? kNaN : m;
  }
}

struct BackwardOperands {
  const float *saved_c, *saved_n, *saved_m, *h, *c_end, *n_end, *m_end;
  const float *h_bar, *c_end_bar, *n_end_bar, *m_end_bar;
};

struct BackwardResults {
  float *q, *k, *v, *log_f, *i_pre, *c0, *n0, *m0;
};

// The adjoint of one step: from the cotangents of h_t (num_bar, and those of q·n and of
// m_t through the normalizer) and of (C_t, n_t) in c_bar, n_bar, leaves those of C_{t-1},
// n_{t-1} there and writes q̄, k̄, v̄; returns (ᾱ, β̄).
// The sum of a vector's lanes, as a tree of shuffles.
inline float Sum(Vec x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(x));
#else
  float lanes[kLanes];
  std::memcpy(lanes, &x, sizeof(x));
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int l = 0; l < half; ++l) lanes[l] += lanes[l + half];
  return lanes[0];
#endif
}

template <int D>
inline void StepAdjoint(const float* __restrict c, const float* __restrict c_prev,
                        const float* __restrict n, const float* __restrict n_prev,
                        const float* __restrict q, const float* __restrict k,
                        const float* __restrict v, const float* __restrict num_bar,
                        float qn_bar, float alpha, float beta, float* __restrict c_bar,
                        float* __restrict n_bar, float* __restrict q_bar,
                        float* __restrict k_bar, float* __restrict v_bar, float* alpha_bar,
                        float* beta_bar, int width) {
  float a_bar = 0.0f, b_bar = 0.0f;
  if constexpr (D > 0 && D % kLanes == 0) {
    // The row sums (C_t h̄', C̄_t·C_{t-1}, C̄_t v) as vectors, summed across lanes once a row.
    constexpr int W = D / kLanes;
    Vec num_bar_v[W], v_v[W], v_bar_v[W];
    // ⟨C̄_t, C_{t-1}⟩ over all rows, summed across lanes at the end.
    Vec prev_acc = Vec{} * 0.0f;
    for (int w = 0; w < W; ++w) {
      num_bar_v[w] = LoadVec(num_bar + w * kLanes);
      v_v[w] = LoadVec(v + w * kLanes);
      v_bar_v[w] = Vec{} * 0.0f;
    }
    for (int i = 0; i < D; ++i) {
      const float qi = q[i], ki = k[i];
      Vec q_acc = Vec{} * 0.0f, cv_acc = q_acc;
      for (int w = 0; w < W; ++w) {
        const int at = i * D + w * kLanes;
        q_acc += LoadVec(c + at) * num_bar_v[w];
        const Vec rb = LoadVec(c_bar + at) + qi * num_bar_v[w];
        prev_acc += rb * LoadVec(c_prev + at);
        cv_acc += rb * v_v[w];
        v_bar_v[w] += ki * rb;
        StoreVec(c_bar + at, alpha * rb);
      }
      const float cv = Sum(cv_acc);
      const float nb = n_bar[i] + qn_bar * qi;
      q_bar[i] = Sum(q_acc) + qn_bar * n[i];
      a_bar += nb * n_prev[i];
      b_bar += ki * (cv + nb);
      k_bar[i] = beta * (cv + nb);
      n_bar[i] = alpha * nb;
    }
    for (int w = 0; w < W; ++w) StoreVec(v_bar + w * kLanes, beta * v_bar_v[w]);
    a_bar += Sum(prev_acc);
  } else {
    const int d = D > 0 ? D : width;
    for (int j = 0; j < d; ++j) v_bar[j] = 0.0f;
    for (int i = 0; i < d; ++i) {
      const float* __restrict row = c + i * d;
      const float* __restrict prev = c_prev + i * d;
      float* __restrict row_bar = c_bar + i * d;
      const float qi = q[i], ki = k[i];
      float q_acc = 0.0f, prev_acc = 0.0f, cv_acc = 0.0f;
      for (int j = 0; j < d; ++j) {
        q_acc += row[j] * num_bar[j];
        const float rb = row_bar[j] + qi * num_bar[j];
        prev_acc += rb * prev[j];
        cv_acc += rb * v[j];
        v_bar[j] += ki * rb;
        row_bar[j] = alpha * rb;
      }
      const float nb = n_bar[i] + qn_bar * qi;
      q_bar[i] = q_acc + qn_bar * n[i];
      a_bar += prev_acc + nb * n_prev[i];
      b_bar += ki * (cv_acc + nb);
      k_bar[i] = beta * (cv_acc + nb);
      n_bar[i] = alpha * nb;
    }
    for (int j = 0; j < d; ++j) v_bar[j] *= beta;
  }
  *alpha_bar = a_bar;
  *beta_bar = b_bar;
}

template <int D>
void BackwardPairs(const Shape& shape, const Operands& in, const BackwardOperands& bw,
                   const BackwardResults& out, int64_t interval, int64_t begin, int64_t end) {
  const Strides at{shape};
  const int d = D > 0 ? D : shape.d;
  const int span = static_cast<int>(interval);
  const size_t dd = static_cast<size_t>(d) * d;
  // The states after every step of one interval, and what the adjoint needs of each step.
  std::vector<float> cs(span * dd), ns(span * d), nums(span * d), ms_prev(span);
  std::vector<StepResult> steps(span);
  std::vector<float> zeros(dd, 0.0f), c_bar(dd), n_bar(d), scratch(3 * d), num_bar(d);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / shape.heads, hd = pair % shape.heads;
    for (size_t i = 0; i < dd; ++i)
      c_bar[i] = std::isnan(bw.c_end[pair * dd + i]) ? 0.0f : bw.c_end_bar[pair * dd + i];
    for (int i = 0; i < d; ++i)
      n_bar[i] = std::isnan(bw.n_end[pair * d + i]) ? 0.0f : bw.n_end_bar[pair * d + i];
    float m_bar = std::isnan(bw.m_end[pair]) ? 0.0f : bw.m_end_bar[pair];
    for (int64_t j = at.Intervals(span) - 1; j >= 0; --j) {
      const int64_t t0 = j * span, t1 = std::min<int64_t>(shape.length, t0 + span);
      const int64_t slot = at.Saved(b, j, hd, span);
      const float* start_c = bw.saved_c + slot * dd;
      const float* start_n = bw.saved_n + slot * d;
      // The state before step t (after its reset).
      auto previous = [&](int s, bool cleared) {
        return std::make_pair(
            cleared ? zeros.data() : (s == 0 ? start_c : cs.data() + (s - 1) * dd),
            cleared ? zeros.data() : (s == 0 ? start_n : ns.data() + (s - 1) * d));
      };
      // Step t's q, k, v as the forward used them (sanitized).
      const float *qs, *ks, *vs;
      auto load = [&](int64_t x) {
        qs = Sanitized(in.q + x, scratch.data(), d);
        ks = Sanitized(in.k + x, scratch.data() + d, d);
        vs = Sanitized(in.v + x, scratch.data() + 2 * d, d);
      };
      float m = bw.saved_m[slot];
      for (int64_t t = t0; t < t1; ++t) {
        const int s = static_cast<int>(t - t0);
        const bool cleared = in.reset[at.Reset(b, t)];
        const auto [c_prev, n_prev] = previous(s, cleared);
        if (cleared) m = 0.0f;
        const int64_t x = at.Vector(b, t, hd), g = at.Gate(b, t, hd);
        load(x);
        ms_prev[s] = m;
        const StepGates gates = Gates(SanitizedLogF(in.log_f[g]), SanitizedInput(in.i_pre[g]), m);
        const float* q[1] = {qs};
        const float* k[1] = {ks};
        const float* v[1] = {vs};
        float* num[1] = {nums.data() + s * d};
        Pass<D, 1>::Run(q, k, v, &gates, c_prev, cs.data() + s * dd, num, d);
        const float q_dot_n = UpdateNormalizer(qs, ks, gates, n_prev, ns.data() + s * d, d);
        steps[s] = {gates.alpha, gates.beta, gates.m, q_dot_n, Denominator(q_dot_n, gates.m)};
        m = gates.m;
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const int s = static_cast<int>(t - t0);
        const StepResult& r = steps[s];
        const bool cleared = in.reset[at.Reset(b, t)];
        const auto [c_prev, n_prev] = previous(s, cleared);
        const int64_t x = at.Vector(b, t, hd), g = at.Gate(b, t, hd);
        load(x);
        // h = num / den, NaN outputs passing no cotangent.
        const float* num = nums.data() + s * d;
        float den_bar = 0.0f;
        for (int i = 0; i < d; ++i) {
          const float hb = std::isnan(bw.h[x + i]) ? 0.0f : bw.h_bar[x + i];
          num_bar[i] = hb / r.denominator;
          den_bar -= hb * num[i] / (r.denominator * r.denominator);
        }
        // den = max(|q·n|, e^{-m}) + eps.
        float abs_bar = 0.0f, floor_bar = 0.0f;
        const float floor = std::exp(-r.m);
        MaxCotangent(std::fabs(r.q_dot_n), floor, den_bar, &abs_bar, &floor_bar);
        const float sign = r.q_dot_n > 0.0f ? 1.0f : (r.q_dot_n < 0.0f ? -1.0f : 0.0f);
        float alpha_bar, beta_bar;
        StepAdjoint<D>(cs.data() + s * dd, c_prev, ns.data() + s * d, n_prev, qs, ks, vs,
                       num_bar.data(), abs_bar * sign, r.alpha, r.beta,
                       c_bar.data(), n_bar.data(), out.q + x, out.k + x, out.v + x,
                       &alpha_bar, &beta_bar, d);
        // α = exp(a - m), β = exp(ĩ - m), m = max(a, ĩ), a = log f + m_{t-1}.
        float a_bar = alpha_bar * r.alpha;
        float i_bar = beta_bar * r.beta;
        const float m_total = m_bar - floor_bar * floor - a_bar - i_bar;
        const float log_f = SanitizedLogF(in.log_f[g]), i_pre = SanitizedInput(in.i_pre[g]);
        MaxCotangent(log_f + ms_prev[s], i_pre, m_total, &a_bar, &i_bar);
        // Bad inputs (replaced by 0) get no cotangent.
        for (int i = 0; i < d; ++i) {
          if (!std::isfinite(in.q[x + i])) out.q[x + i] = 0.0f;
          if (!std::isfinite(in.k[x + i])) out.k[x + i] = 0.0f;
          if (!std::isfinite(in.v[x + i])) out.v[x + i] = 0.0f;
        }
        out.log_f[g] = log_f == in.log_f[g] ? a_bar : 0.0f;
        out.i_pre[g] = NanOrPlusInf(in.i_pre[g]) ? 0.0f : i_bar;
        m_bar = a_bar;
        if (cleared) {
          std::fill(c_bar.begin(), c_bar.end(), 0.0f);
          std::fill(n_bar.begin(), n_bar.end(), 0.0f);
          m_bar = 0.0f;
        }
      }
    }
    const float* c0 = in.c0 + pair * dd;
    const float* n0 = in.n0 + pair * d;
    for (size_t i = 0; i < dd; ++i) out.c0[pair * dd + i] = std::isfinite(c0[i]) ? c_bar[i] : 0.0f;
    for (int i = 0; i < d; ++i) out.n0[pair * d + i] = std::isfinite(n0[i]) ? n_bar[i] : 0.0f;
    out.m0[pair] = NanOrPlusInf(in.m0[pair]) ? 0.0f : m_bar;
  }
}

// Runs Fn<D> with D the width when it is one the loops are unrolled for, else Fn<0>.
template <template <int> class Fn, typename... Args>
void ForWidth(int d, Args&&... args) {
  switch (d) {
    case 16: return Fn<16>::Run(args...);
    case 32: return Fn<32>::Run(args...);
    case 48: return Fn<48>::Run(args...);
    case 64: return Fn<64>::Run(args...);
    case 96: return Fn<96>::Run(args...);
    case 128: return Fn<128>::Run(args...);
    default: return Fn<0>::Run(args...);
  }
}

template <int D>
struct RunForward {
  static void Run(const Shape& shape, const Operands& in, const ForwardResults& out,
                  int64_t interval, int64_t begin, int64_t end) {
    ForwardPairs<D>(shape, in, out, interval, begin, end);
  }
};

template <int D>
struct RunBackward {
  static void Run(const Shape& shape, const Operands& in, const BackwardOperands& bw,
                  const BackwardResults& out, int64_t interval, int64_t begin, int64_t end) {
    BackwardPairs<D>(shape, in, bw, out, interval, begin, end);
  }
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> log_f,
                   ffi::Buffer<ffi::F32> i_pre, ffi::Buffer<ffi::PRED> reset,
                   ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> n0, ffi::Buffer<ffi::F32> m0,
                   int64_t interval, ffi::ResultBuffer<ffi::F32> h,
                   ffi::ResultBuffer<ffi::F32> c_end, ffi::ResultBuffer<ffi::F32> n_end,
                   ffi::ResultBuffer<ffi::F32> m_end, ffi::ResultBuffer<ffi::F32> saved_c,
                   ffi::ResultBuffer<ffi::F32> saved_n, ffi::ResultBuffer<ffi::F32> saved_m) {
  Shape shape;
  if (auto error = CheckShapes(q, k, v, log_f, i_pre, reset, c0, n0, m0, &shape); error.failure())
    return error;
  const Strides at{shape};
  if (interval < 0 ||
      saved_m->element_count() !=
          (interval > 0 ? shape.batch * at.Intervals(interval) * shape.heads : 0))
    return ffi::Error::InvalidArgument("raw_memory: the saved states' shape and interval differ");
  const Operands in = Pointers(q, k, v, log_f, i_pre, reset, c0, n0, m0);
  const ForwardResults out{h->typed_data(),       c_end->typed_data(),   n_end->typed_data(),
                           m_end->typed_data(),   saved_c->typed_data(), saved_n->typed_data(),
                           saved_m->typed_data()};
  ParallelFor(pool, shape.batch * shape.heads, [&](int64_t begin, int64_t end) {
    ForWidth<RunForward>(shape.d, shape, in, out, interval, begin, end);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> log_f,
                    ffi::Buffer<ffi::F32> i_pre, ffi::Buffer<ffi::PRED> reset,
                    ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> n0, ffi::Buffer<ffi::F32> m0,
                    ffi::Buffer<ffi::F32> saved_c, ffi::Buffer<ffi::F32> saved_n,
                    ffi::Buffer<ffi::F32> saved_m, ffi::Buffer<ffi::F32> h,
                    ffi::Buffer<ffi::F32> c_end, ffi::Buffer<ffi::F32> n_end,
                    ffi::Buffer<ffi::F32> m_end, ffi::Buffer<ffi::F32> h_bar,
                    ffi::Buffer<ffi::F32> c_end_bar, ffi::Buffer<ffi::F32> n_end_bar,
                    ffi::Buffer<ffi::F32> m_end_bar, int64_t interval,
                    ffi::ResultBuffer<ffi::F32> q_bar, ffi::ResultBuffer<ffi::F32> k_bar,
                    ffi::ResultBuffer<ffi::F32> v_bar, ffi::ResultBuffer<ffi::F32> log_f_bar,
                    ffi::ResultBuffer<ffi::F32> i_bar, ffi::ResultBuffer<ffi::F32> c0_bar,
                    ffi::ResultBuffer<ffi::F32> n0_bar, ffi::ResultBuffer<ffi::F32> m0_bar) {
  Shape shape;
  if (auto error = CheckShapes(q, k, v, log_f, i_pre, reset, c0, n0, m0, &shape); error.failure())
    return error;
  const Strides at{shape};
  if (interval < 1 || saved_m.element_count() != shape.batch * at.Intervals(interval) * shape.heads)
    return ffi::Error::InvalidArgument("raw_memory: backward needs the states saved every "
                                       "`interval` (>= 1) steps");
  const Operands in = Pointers(q, k, v, log_f, i_pre, reset, c0, n0, m0);
  const BackwardOperands bw{saved_c.typed_data(), saved_n.typed_data(),   saved_m.typed_data(),
                            h.typed_data(),       c_end.typed_data(),     n_end.typed_data(),
                            m_end.typed_data(),   h_bar.typed_data(),     c_end_bar.typed_data(),
                            n_end_bar.typed_data(), m_end_bar.typed_data()};
  const BackwardResults out{q_bar->typed_data(),     k_bar->typed_data(),
                            v_bar->typed_data(),     log_f_bar->typed_data(),
                            i_bar->typed_data(),     c0_bar->typed_data(),
                            n0_bar->typed_data(),    m0_bar->typed_data()};
  ParallelFor(pool, shape.batch * shape.heads, [&](int64_t begin, int64_t end) {
    ForWidth<RunBackward>(shape.d, shape, in, bw, out, interval, begin, end);
  });
  return ffi::Error::Success();
}

// The binding of the operands both directions take first.
template <typename Binding>
auto WithOperands(Binding&& binding) {
  return std::forward<Binding>(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()   // q
      .template Arg<ffi::Buffer<ffi::F32>>()   // k̂
      .template Arg<ffi::Buffer<ffi::F32>>()   // v
      .template Arg<ffi::Buffer<ffi::F32>>()   // log f
      .template Arg<ffi::Buffer<ffi::F32>>()   // ĩ
      .template Arg<ffi::Buffer<ffi::PRED>>()  // reset
      .template Arg<ffi::Buffer<ffi::F32>>()   // C0
      .template Arg<ffi::Buffer<ffi::F32>>()   // n0
      .template Arg<ffi::Buffer<ffi::F32>>();  // m0
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthorecallRawMemoryForward, Forward,
                              WithOperands(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                                  .Attr<int64_t>("interval")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // h
                                  .Ret<ffi::Buffer<ffi::F32>>()    // C end
                                  .Ret<ffi::Buffer<ffi::F32>>()    // n end
                                  .Ret<ffi::Buffer<ffi::F32>>()    // m end
                                  .Ret<ffi::Buffer<ffi::F32>>()    // saved C
                                  .Ret<ffi::Buffer<ffi::F32>>()    // saved n
                                  .Ret<ffi::Buffer<ffi::F32>>());  // saved m

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthorecallRawMemoryBackward, Backward,
                              WithOperands(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                                  .Arg<ffi::Buffer<ffi::F32>>()   // saved C
                                  .Arg<ffi::Buffer<ffi::F32>>()   // saved n
                                  .Arg<ffi::Buffer<ffi::F32>>()   // saved m
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // C end
                                  .Arg<ffi::Buffer<ffi::F32>>()   // n end
                                  .Arg<ffi::Buffer<ffi::F32>>()   // m end
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h̄
                                  .Arg<ffi::Buffer<ffi::F32>>()   // C̄ end
                                  .Arg<ffi::Buffer<ffi::F32>>()   // n̄ end
                                  .Arg<ffi::Buffer<ffi::F32>>()   // m̄ end
                                  .Attr<int64_t>("interval")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // q̄
                                  .Ret<ffi::Buffer<ffi::F32>>()    // k̄
                                  .Ret<ffi::Buffer<ffi::F32>>()    // v̄
                                  .Ret<ffi::Buffer<ffi::F32>>()    // log f̄
                                  .Ret<ffi::Buffer<ffi::F32>>()    // ī
                                  .Ret<ffi::Buffer<ffi::F32>>()    // C̄0
                                  .Ret<ffi::Buffer<ffi::F32>>()    // n̄0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // m̄0
