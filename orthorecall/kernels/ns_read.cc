// Fused Newton–Schulz read for XLA:CPU: h = NS_k(C)ᵀ q and its VJP.
//
// XLA:CPU runs a batch of 48x48 products at about a quarter of one core's
// peak and on one thread (each tiny product is a separate library call with
// its own packing). The read is nothing but such products, so here every
// matrix is carried through all k iterations while it sits in L1/L2, with a
// register-tiled product written with GCC vector extensions (any SIMD width
// the compiler targets), and the batch is split over XLA's intra-op threads.
//
// For steps without a quintic term (the cubic NS_k), k <= 6 and d > 16, the iterates are never
// formed: h is M_{k-1} ··· M_0 X0ᵀq with M_j polynomials in G = X0ᵀX0, evaluated by
// (3^k - 1) / 2 products of G with a vector (see "The read through the Gram matrix"
// below; 121 for NS5, a quarter of the explicit iteration's flops). The forward of k >= 5
// first forms G_1 = G M_0² (two products of matrices) and runs the rest on it: 41
// products with a vector for NS5 (see ForwardLifts).
//
// Two entry points: the read of given memories (OrthorecallNsRead*), and the chunk read
// (OrthorecallChunkRead*), which first forms each memory of a chunk of the chunkwise mLSTM
// from the chunk-start memory and the chunk's keys, values and decay matrix (see "The
// chunk read" below), so that those memories never exist outside the kernel.
//
// Only the read's result h = NS_k(C)ᵀ q leaves the kernel; the backward
// recomputes the iterates per matrix, so neither pass stores a d x d array per
// iteration in memory (the XLA formulation keeps 2k of them per position).
//
// The function is orthorecall.newton_schulz's: X0 = C / max(|C|_F, 1e-6) (with C
// first scaled down by a power of two when its largest entry is 2^32 or more);
// X <- X P(XᵀX) with P(G) = aI + bG + cG², in float32, except that the squared
// Frobenius norm is accumulated in double. Products are summed in another order
// than XLA's, so the two agree to float32 rounding, not bit for bit (the tests
// compare them, and both with float64 numpy).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using orthorecall::ParallelFor;

namespace {

// A tile's accumulators (kRows x up to 3 vectors) must stay in registers: with
// AVX-512's 32 registers of 16 floats that is 8 x 3; with 16 registers of 8
// floats (AVX2) 4 x 3, as 16-float vectors split in two would need 48 registers
// and spill (measured 5 GFLOP/s instead of 177 on an AVX2 machine).
#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector
constexpr int kRows = 8;    // rows per register tile
#else
constexpr int kLanes = 8;
constexpr int kRows = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
// Padded sizes are multiples of kLanes, hence of kRows.
static_assert(kLanes % kRows == 0, "a tile's rows must divide the padded size");
constexpr float kFrobeniusFloor = 1e-6f;

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// One kRows x (W vectors) tile of C = op(A) B, all n x n row-major, where
// op(A) = A or Aᵀ. Accumulators stay in registers for the whole k loop.
template <int W, bool kTransposeA>
inline void Tile(const float* a, const float* b, float* c, int n, int i0, int j0) {
  Vec acc[kRows][W] = {};
  for (int k = 0; k < n; ++k) {
    Vec bk[W];
    for (int w = 0; w < W; ++w) bk[w] = Load(b + k * n + j0 + w * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float s = kTransposeA ? a[k * n + i0 + r] : a[(i0 + r) * n + k];
      for (int w = 0; w < W; ++w) acc[r][w] += s * bk[w];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int w = 0; w < W; ++w) Store(c + (i0 + r) * n + j0 + w * kLanes, acc[r][w]);
}

// C = op(A) B for n x n matrices, n a multiple of kLanes. C must not alias.
template <bool kTransposeA>
void MatMul(const float* a, const float* b, float* c, int n) {
  const int vectors = n / kLanes;
  // Three vectors per row tile (24 accumulators) where the width allows.
  const int width = vectors % 3 == 0 ? 3 : (vectors % 2 == 0 ? 2 : 3);
  for (int j = 0; j < vectors; j += width) {
    const int w = std::min(width, vectors - j);
    for (int i = 0; i < n; i += kRows) {
      switch (w) {
        case 3: Tile<3, kTransposeA>(a, b, c, n, i, j * kLanes); break;
        case 2: Tile<2, kTransposeA>(a, b, c, n, i, j * kLanes); break;
        default: Tile<1, kTransposeA>(a, b, c, n, i, j * kLanes); break;
      }
    }
  }
}

struct Step {
  float a, b, c;
};

// Work space of one thread: n x n matrices, 64-byte aligned.
class Scratch {
 public:
  Scratch(int n, int count) : n_(n), data_(static_cast<float*>(
      std::aligned_alloc(64, sizeof(float) * static_cast<size_t>(n) * n * count))) {}
  ~Scratch() { std::free(data_); }
  float* operator[](int i) { return data_ + static_cast<size_t>(i) * n_ * n_; }

 private:
  int n_;
  float* data_;
};

// How Normalize scaled a matrix: x0 = (c * prescale) * scale, where prescale is the
// power of two that keeps the sum of squares finite (1 for ordinary matrices) and
// scale = 1 / max(|c * prescale|_F, floor); clamped tells whether the floor was hit.
struct Normalization {
  float prescale, scale;
  bool clamped;
};

// Frobenius-normalizes the d x d matrix c into the zero-padded n x n x0, as
// orthorecall.newton_schulz.frobenius_normalize does: a matrix whose largest magnitude
// is 2^32 or more is first scaled, exactly, by the power of two that brings it into
// [2, 4); otherwise its float32 norm would overflow (from about 1.2e18) and read 0.
Normalization Normalize(const float* c, int d, int n, float* x0) {
  // Partial maxima, for the same reason as the partial sums below. A NaN entry is
  // lost here (max ignores it) but not in the sum, which makes the read NaN anyway.
  float partial_max[8] = {};
  int e = 0;
  for (; e + 8 <= d * d; e += 8)
    for (int lane = 0; lane < 8; ++lane)
      partial_max[lane] = std::max(partial_max[lane], std::fabs(c[e + lane]));
  for (; e < d * d; ++e) partial_max[0] = std::max(partial_max[0], std::fabs(c[e]));
  float largest = 0.0f;
  for (float value : partial_max) largest = std::max(largest, value);
  float prescale = 1.0f;
  // Not finite: the sum is inf or NaN and so is the read, prescaled or not.
  if (largest >= 0x1p32f && std::isfinite(largest)) {
    int exponent;  // largest = f 2^exponent, f in [0.5, 1)
    std::frexp(largest, &exponent);
    prescale = std::ldexp(1.0f, 2 - exponent);  // at least 2^-126, a normal float
  }
  // Eight partial sums: one chain of dependent double additions would take as long as
  // the whole read of a small matrix.
  double partial[8] = {};
  const int total = d * d;
  int i = 0;
  for (; i + 8 <= total; i += 8)
    for (int lane = 0; lane < 8; ++lane) {
      const float v = c[i + lane] * prescale;
      partial[lane] += static_cast<double>(v) * v;
    }
  for (; i < total; ++i) {
    const float v = c[i] * prescale;
    partial[0] += static_cast<double>(v) * v;
  }
  const double sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                     ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  const float norm_sq = static_cast<float>(sum);
  const float floor_sq = kFrobeniusFloor * kFrobeniusFloor;
  Normalization result;
  result.clamped = !(norm_sq > floor_sq);
  result.prescale = prescale;
  result.scale = 1.0f / std::sqrt(std::max(norm_sq, floor_sq));
  std::memset(x0, 0, sizeof(float) * n * n);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) x0[i * n + j] = c[i * d + j] * prescale * result.scale;
  return result;
}

// p = aI + b g + c g² (g2 holds g² when c != 0).
void Polynomial(const Step& s, const float* g, const float* g2, float* p, int n) {
  for (int i = 0; i < n * n; ++i) p[i] = s.b * g[i] + (s.c != 0.0f ? s.c * g2[i] : 0.0f);
  for (int i = 0; i < n; ++i) p[i * n + i] += s.a;
}

// One iteration: g = xᵀx, then next = x P(g). Uses tmp (and tmp2 if c != 0).
void Iterate(const Step& s, const float* x, float* g, float* p, float* tmp, float* next, int n) {
  MatMul<true>(x, x, g, n);
  if (s.c != 0.0f) MatMul<false>(g, g, tmp, n);
  Polynomial(s, g, tmp, p, n);
  MatMul<false>(x, p, next, n);
}

// a <- a + aᵀ in place (n x n).
void AddTranspose(float* a, int n) {
  for (int r = 0; r < n; ++r)
    for (int col = r; col < n; ++col) {
      const float v = a[r * n + col] + a[col * n + r];
      a[r * n + col] = v;
      a[col * n + r] = v;
    }
}

int Padded(int d) { return (d + kLanes - 1) / kLanes * kLanes; }

// X0 = s P C with s = 1/max(|P C|, floor) and P the prescale:
// C̄ = P s (X̄0 - <X̄0, X0> X0) unless clamped. P is applied last: P s alone
// could be subnormal (for |C| near 3e38) and lose bits.
void WriteMemoryCotangent(const Normalization& norm, const float* x0, const float* x0_bar,
                          float* c_bar, int d, int n) {
  float inner = 0.0f;
  if (!norm.clamped)
    for (int e = 0; e < n * n; ++e) inner += x0_bar[e] * x0[e];
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j)
      c_bar[i * d + j] = norm.scale * (x0_bar[i * n + j] - inner * x0[i * n + j]) * norm.prescale;
}

// A 64-byte aligned float buffer of one thread.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t count)
      : data_(static_cast<float*>(std::aligned_alloc(64, (sizeof(float) * count + 63) / 64 * 64))) {}
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* data() { return data_; }

 private:
  float* data_;
};

// ---- The read through the Gram matrix, for steps without a quintic term ----
//
// With G = X0ᵀX0, every iterate of X <- X (aI + bXᵀX) is X0 times a polynomial in G:
// G_j = X_jᵀX_j and M_j = a_j I + b_j G_j commute, X_{j+1} = X_j M_j and
// G_{j+1} = G_j M_j², so h = X_kᵀq = M_{k-1} ··· M_0 (X0ᵀq), and G_j v is
// M_{j-1} G_{j-1} M_{j-1} v down to G v: (3^k - 1) / 2 products of G with a vector
// (121 for NS5, 0.56 MFLOP at d = 48) and one G = X0ᵀX0, instead of 2k matrix
// products (2.2 MFLOP). Beyond kGramMaxSteps the 3^k products cost more than the
// products they replace, and G's rounding (eigenvalues a few ulps below zero, which
// the map g -> g (a + b g)² amplifies by a² = 2.25 per step) would start to matter.
constexpr int kGramMaxSteps = 6;
// Small memories are the other way round: at d <= 16 a matrix product is a handful of
// vector instructions, while the 121 products with a vector form a chain of dependent
// steps. Measured (NS5, AVX-512, microseconds per matrix forward | forward+backward,
// explicit vs Gram): d = 8 0.57|1.76 vs 0.98|2.74, d = 16 0.64|2.13 vs 1.37|3.70,
// d = 24 3.72|11.3 vs 2.56|7.90, d = 32 3.88|12.0 vs 3.04|9.50, d = 48 12.0|35.8 vs
// 6.46|20.2, d = 64 27.5|77.3 vs 10.7|34.5.
constexpr int kGramMinDim = 17;

bool UseGram(const std::vector<Step>& steps, int d) {
  if (d < kGramMinDim) return false;
  if (steps.empty() || steps.size() > static_cast<size_t>(kGramMaxSteps)) return false;
  for (const Step& s : steps)
    if (s.c != 0.0f) return false;
  return true;
}

// The nested read as a straight-line program over vectors ("slots") of n floats:
// slot 0 holds y = X0ᵀq, each op writes a new slot, and backward walks it in reverse.
struct VecOp {
  bool matvec;  // dst = G src1; otherwise dst = a src1 + b src2
  int src1, src2, dst;
  float a, b;
};

class GramProgram {
 public:
  explicit GramProgram(const std::vector<Step>& steps) : steps_(steps) {
    int h = 0;
    for (int level = 0; level < static_cast<int>(steps.size()); ++level) h = TimesM(level, h);
    result_ = h;
  }
  const std::vector<VecOp>& ops() const { return ops_; }
  int slots() const { return slots_; }
  int result() const { return result_; }

 private:
  int TimesGram(int level, int v) {  // G_level v
    if (level == 0) {
      ops_.push_back({true, v, -1, slots_, 0.0f, 0.0f});
      return slots_++;
    }
    const int u = TimesM(level - 1, v);
    return TimesM(level - 1, TimesGram(level - 1, u));
  }
  int TimesM(int level, int v) {  // M_level v = a v + b G_level v
    const int t = TimesGram(level, v);
    ops_.push_back({false, v, t, slots_, steps_[level].a, steps_[level].b});
    return slots_++;
  }
  std::vector<Step> steps_;
  std::vector<VecOp> ops_;
  int slots_ = 1;
  int result_ = 0;
};

// W output vectors of out = G v, G symmetric (row j = column j) and zero beyond d:
// out = Σ_j v_j G[j, :]. Each product depends on the one before, so the chains of
// dependent FMAs bound the speed: four accumulator sets (j mod 4) cut them to d / 4.
template <int W>
inline void MatVecBlock(const float* g, const float* v, float* out, int d, int n, int j0) {
  constexpr int kSets = 4;
  Vec acc[kSets][W] = {};
  int j = 0;
  for (; j + kSets <= d; j += kSets) {
    const float* row = g + j * n + j0;
    for (int set = 0; set < kSets; ++set) {
      const float scalar = v[j + set];
      for (int w = 0; w < W; ++w) acc[set][w] += scalar * Load(row + set * n + w * kLanes);
    }
  }
  for (; j < d; ++j)
    for (int w = 0; w < W; ++w) acc[0][w] += v[j] * Load(g + j * n + j0 + w * kLanes);
  for (int w = 0; w < W; ++w)
    Store(out + j0 + w * kLanes, (acc[0][w] + acc[1][w]) + (acc[2][w] + acc[3][w]));
}

void MatVec(const float* g, const float* v, float* out, int d, int n) {
  const int vectors = n / kLanes;
  for (int w0 = 0; w0 < vectors; w0 += 4) {
    switch (std::min(4, vectors - w0)) {
      case 4: MatVecBlock<4>(g, v, out, d, n, w0 * kLanes); break;
      case 3: MatVecBlock<3>(g, v, out, d, n, w0 * kLanes); break;
      case 2: MatVecBlock<2>(g, v, out, d, n, w0 * kLanes); break;
      default: MatVecBlock<1>(g, v, out, d, n, w0 * kLanes); break;
    }
  }
}

// One kRows x W-vector tile of Ḡ = Σ_p w̄_p u_pᵀ over the program's products
// (w̄_p the adjoint of product p's output, u_p its input), accumulated in registers.
template <int W>
inline void OuterTile(const GramProgram& program, const float* adjoints, const float* slots,
                      float* g_bar, int n, int i0, int j0) {
  Vec acc[kRows][W] = {};
  for (const VecOp& op : program.ops()) {
    if (!op.matvec) continue;
    const float* w_bar = adjoints + static_cast<size_t>(op.dst) * n + i0;
    const float* u = slots + static_cast<size_t>(op.src1) * n + j0;
    Vec uk[W];
    for (int w = 0; w < W; ++w) uk[w] = Load(u + w * kLanes);
    for (int r = 0; r < kRows; ++r)
      for (int w = 0; w < W; ++w) acc[r][w] += w_bar[r] * uk[w];
  }
  for (int r = 0; r < kRows; ++r)
    for (int w = 0; w < W; ++w) Store(g_bar + (i0 + r) * n + j0 + w * kLanes, acc[r][w]);
}

void OuterProducts(const GramProgram& program, const float* adjoints, const float* slots,
                   float* g_bar, int n) {
  const int vectors = n / kLanes;
  const int width = vectors % 3 == 0 ? 3 : (vectors % 2 == 0 ? 2 : 3);
  for (int j = 0; j < vectors; j += width) {
    const int w = std::min(width, vectors - j);
    for (int i = 0; i < n; i += kRows) {
      switch (w) {
        case 3: OuterTile<3>(program, adjoints, slots, g_bar, n, i, j * kLanes); break;
        case 2: OuterTile<2>(program, adjoints, slots, g_bar, n, i, j * kLanes); break;
        default: OuterTile<1>(program, adjoints, slots, g_bar, n, i, j * kLanes); break;
      }
    }
  }
}

// Runs the program: slots[0] must hold y; every other slot is written.
void RunGramProgram(const GramProgram& program, const float* g, float* slots, int d, int n) {
  for (const VecOp& op : program.ops()) {
    float* dst = slots + static_cast<size_t>(op.dst) * n;
    const float* src1 = slots + static_cast<size_t>(op.src1) * n;
    if (op.matvec) {
      MatVec(g, src1, dst, d, n);
    } else {
      const float* src2 = slots + static_cast<size_t>(op.src2) * n;
      for (int i = 0; i < n; ++i) dst[i] = op.a * src1[i] + op.b * src2[i];
    }
  }
}

// c = op(a) b for n x n matrices whose product is known to be symmetric (aᵀa, or a b
// with a, b symmetric and commuting): only the tiles on or above the diagonal are
// multiplied (two thirds of the product at n = 48), the rest mirrored. Each computed
// entry is the same sum in the same order as in MatMul, so aᵀa is bit for bit what
// MatMul<true> gives.
template <bool kTransposeA>
void SymmetricProduct(const float* a, const float* b, float* c, int n) {
  for (int i = 0; i < n; i += kRows)
    for (int j0 = i / kLanes * kLanes; j0 < n; j0 += kLanes)
      Tile<1, kTransposeA>(a, b, c, n, i, j0);
  for (int r = 1; r < n; ++r)
    for (int col = 0; col < r; ++col) c[r * n + col] = c[col * n + r];
}

// Forward only, long schedules: the first level's M_0 = aI + bG is applied to y by one
// product with a vector, and G_1 = G M_0² = a²G + 2ab G² + b²G³ is formed with two
// products of matrices (two thirds each, by symmetry), so the rest of the schedule runs
// on G_1: for NS5 1 + 40 products with a vector instead of 121. A product with a vector
// is bound by loading G (about 1.7 cycles per vector FMA measured at d = 48, AVX-512)
// while a register-tiled product of matrices runs at about one, so trading 80 of the
// former (80 d² FMAs) for two of the latter (4/3 d³) pays from k = 5 on at d = 48 (the
// next level would trade 26 for two: it does not). Backward keeps the plain program.
constexpr int kLiftMinSteps = 5;

int ForwardLifts(const std::vector<Step>& steps) {
  int lifts = 0;
  while (static_cast<int>(steps.size()) - lifts >= kLiftMinSteps) ++lifts;
  return lifts;
}

// x0 (n x n, zero beyond d) -> g = x0ᵀx0 and y = x0ᵀq (n floats, zero beyond d).
void GramAndProjection(const float* x0, const float* q, float* g, float* y, int d, int n) {
  SymmetricProduct<true>(x0, x0, g, n);
  std::memset(y, 0, sizeof(float) * n);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < n; ++j) y[j] += q[i] * x0[i * n + j];
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& c, ffi::Buffer<ffi::F32>& q, int64_t* count,
                       int* d, ffi::Span<const float> coefficients) {
  auto dims = c.dimensions();
  if (dims.size() < 2 || dims[dims.size() - 1] != dims[dims.size() - 2])
    return ffi::Error::InvalidArgument("ns_read: memory must be (..., d, d)");
  *d = static_cast<int>(dims[dims.size() - 1]);
  *count = c.element_count() / (static_cast<int64_t>(*d) * *d);
  if (q.element_count() != *count * *d)
    return ffi::Error::InvalidArgument("ns_read: query must be (..., d) matching the memory");
  if (coefficients.size() % 3 != 0)
    return ffi::Error::InvalidArgument("ns_read: coefficients must be (a, b, c) triples");
  return ffi::Error::Success();
}

std::vector<Step> Steps(ffi::Span<const float> coefficients) {
  std::vector<Step> steps;
  for (size_t i = 0; i + 2 < coefficients.size(); i += 3)
    steps.push_back({coefficients[i], coefficients[i + 1], coefficients[i + 2]});
  return steps;
}

// One thread's reader: the read of one memory at a time, forward or backward, with
// its work space allocated once.
class Reader {
 public:
  Reader(const std::vector<Step>& steps, int d, bool backward)
      : steps_(steps),
        d_(d),
        n_(Padded(d)),
        gram_(UseGram(steps, d)),
        lifts_(gram_ && !backward ? ForwardLifts(steps) : 0),
        program_(gram_ ? std::vector<Step>(steps.begin() + lifts_, steps.end())
                       : std::vector<Step>()),
        scratch_(n_, gram_ ? 4 : (backward ? 2 * static_cast<int>(steps.size()) + 6 : 5)),
        slots_(gram_ ? static_cast<size_t>(program_.slots()) * n_ : 1),
        adjoints_(gram_ && backward ? static_cast<size_t>(program_.slots()) * n_ : 1),
        product_(n_) {}

  // h = NS_k(c)ᵀq; c is d x d row-major, q and h d floats.
  void Forward(const float* c, const float* q, float* h) {
    const int d = d_, n = n_;
    if (gram_) {
      float *x0 = scratch_[0], *g = scratch_[1], *g2 = scratch_[2], *g3 = scratch_[3];
      float *y = slots_.data(), *product = product_.data();
      Normalize(c, d, n, x0);
      GramAndProjection(x0, q, g, y, d, n);
      for (int level = 0; level < lifts_; ++level) {
        const float a = steps_[level].a, b = steps_[level].b;
        MatVec(g, y, product, d, n);
        for (int i = 0; i < n; ++i) y[i] = a * y[i] + b * product[i];
        SymmetricProduct<true>(g, g, g2, n);    // G² = GᵀG
        SymmetricProduct<false>(g, g2, g3, n);  // G³
        for (int e = 0; e < n * n; ++e) g[e] = a * a * g[e] + 2 * a * b * g2[e] + b * b * g3[e];
      }
      RunGramProgram(program_, g, y, d, n);
      std::memcpy(h, slots_.data() + static_cast<size_t>(program_.result()) * n,
                  sizeof(float) * d);
      return;
    }
    float *x = scratch_[0], *next = scratch_[1], *g = scratch_[2], *p = scratch_[3],
          *tmp = scratch_[4];
    Normalize(c, d, n, x);
    for (const Step& s : steps_) {
      Iterate(s, x, g, p, tmp, next, n);
      std::swap(x, next);
    }
    for (int j = 0; j < d; ++j) h[j] = 0.0f;
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) h[j] += q[i] * x[i * n + j];
  }

  // (c̄, q̄) for h̄: the VJP of Forward at (c, q).
  void Backward(const float* c, const float* q, const float* h_bar, float* c_bar, float* q_bar) {
    if (gram_) {
      GramBackward(c, q, h_bar, c_bar, q_bar);
    } else {
      ExplicitBackward(c, q, h_bar, c_bar, q_bar);
    }
  }

 private:
  void GramBackward(const float* c, const float* q, const float* h_bar, float* c_bar,
                    float* q_bar) {
    const int d = d_, n = n_;
    const size_t size = static_cast<size_t>(program_.slots()) * n;
    float *x0 = scratch_[0], *g = scratch_[1], *g_bar = scratch_[2], *x_bar = scratch_[3];
    float *slots = slots_.data(), *adjoints = adjoints_.data(), *product = product_.data();
    const Normalization norm = Normalize(c, d, n, x0);
    GramAndProjection(x0, q, g, slots, d, n);
    RunGramProgram(program_, g, slots, d, n);
    // Reverse sweep with G fixed: a slot's adjoint is complete when the sweep
    // reaches the op that wrote it (its uses all come later in the program).
    std::memset(adjoints, 0, sizeof(float) * size);
    std::memcpy(adjoints + static_cast<size_t>(program_.result()) * n, h_bar, sizeof(float) * d);
    const auto& ops = program_.ops();
    for (auto op = ops.rbegin(); op != ops.rend(); ++op) {
      const float* dst_bar = adjoints + static_cast<size_t>(op->dst) * n;
      float* src1_bar = adjoints + static_cast<size_t>(op->src1) * n;
      if (op->matvec) {
        MatVec(g, dst_bar, product, d, n);  // Gᵀ = G
        for (int i = 0; i < n; ++i) src1_bar[i] += product[i];
      } else {
        float* src2_bar = adjoints + static_cast<size_t>(op->src2) * n;
        for (int i = 0; i < n; ++i) {
          src1_bar[i] += op->a * dst_bar[i];
          src2_bar[i] += op->b * dst_bar[i];
        }
      }
    }
    // Ḡ = Σ over products w = G u of w̄ uᵀ: a (n x N)(N x n) product.
    OuterProducts(program_, adjoints, slots, g_bar, n);
    // G = X0ᵀX0, y = X0ᵀq: X̄0 = X0 (Ḡ + Ḡᵀ) + q ȳᵀ and q̄ = X0 ȳ.
    AddTranspose(g_bar, n);
    MatMul<false>(x0, g_bar, x_bar, n);
    const float* y_bar = adjoints;
    for (int i = 0; i < d; ++i) {
      float sum = 0.0f;
      for (int j = 0; j < d; ++j) {
        x_bar[i * n + j] += q[i] * y_bar[j];
        sum += x0[i * n + j] * y_bar[j];
      }
      q_bar[i] = sum;
    }
    WriteMemoryCotangent(norm, x0, x_bar, c_bar, d, n);
  }

  void ExplicitBackward(const float* c, const float* q, const float* h_bar, float* c_bar,
                        float* q_bar) {
    const int d = d_, n = n_, k = static_cast<int>(steps_.size());
    // Iterates X_0..X_k and Grams G_0..G_{k-1}, then five work matrices.
    auto iterate = [&](int i) { return scratch_[i]; };
    auto gram = [&](int i) { return scratch_[k + 1 + i]; };
    float *y_bar = scratch_[2 * k + 1], *p = scratch_[2 * k + 2], *m_xy = scratch_[2 * k + 3],
          *sym = scratch_[2 * k + 4], *tmp = scratch_[2 * k + 5];
    const Normalization norm = Normalize(c, d, n, iterate(0));
    for (int i = 0; i < k; ++i) Iterate(steps_[i], iterate(i), gram(i), p, tmp, iterate(i + 1), n);
    const float* x_out = iterate(k);
    // h = Xᵀq: q̄ = X h̄ and X̄ = q h̄ᵀ.
    for (int i = 0; i < d; ++i) {
      float sum = 0.0f;
      for (int j = 0; j < d; ++j) sum += x_out[i * n + j] * h_bar[j];
      q_bar[i] = sum;
    }
    std::memset(y_bar, 0, sizeof(float) * n * n);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) y_bar[i * n + j] = q[i] * h_bar[j];
    // Y = X P(G), G = XᵀX:  X̄ = Ȳ P(G) + X (Ḡ + Ḡᵀ),
    // Ḡ = b XᵀȲ + c (G XᵀȲ + XᵀȲ G).
    for (int i = k - 1; i >= 0; --i) {
      const Step& s = steps_[i];
      const float* x = iterate(i);
      const float* g = gram(i);
      MatMul<true>(x, y_bar, m_xy, n);
      if (s.c != 0.0f) {
        MatMul<false>(g, g, tmp, n);
        Polynomial(s, g, tmp, p, n);
        MatMul<false>(g, m_xy, tmp, n);
        for (int e = 0; e < n * n; ++e) sym[e] = s.b * m_xy[e] + s.c * tmp[e];
        MatMul<false>(m_xy, g, tmp, n);
        for (int e = 0; e < n * n; ++e) sym[e] += s.c * tmp[e];
      } else {
        Polynomial(s, g, nullptr, p, n);
        for (int e = 0; e < n * n; ++e) sym[e] = s.b * m_xy[e];
      }
      AddTranspose(sym, n);  // sym <- Ḡ + Ḡᵀ
      MatMul<false>(y_bar, p, tmp, n);
      MatMul<false>(x, sym, y_bar, n);
      for (int e = 0; e < n * n; ++e) y_bar[e] += tmp[e];
    }
    WriteMemoryCotangent(norm, iterate(0), y_bar, c_bar, d, n);
  }

  std::vector<Step> steps_;
  int d_, n_;
  bool gram_;
  int lifts_;  // levels applied by forming G_{j+1} (forward only)
  GramProgram program_;
  Scratch scratch_;
  AlignedBuffer slots_, adjoints_, product_;
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> q,
                   ffi::Span<const float> coefficients, ffi::ResultBuffer<ffi::F32> h) {
  int64_t count;
  int d;
  if (auto error = CheckShapes(c, q, &count, &d, coefficients); error.failure()) return error;
  const std::vector<Step> steps = Steps(coefficients);
  const float* c_data = c.typed_data();
  const float* q_data = q.typed_data();
  float* h_data = h->typed_data();
  ParallelFor(pool, count, [&](int64_t begin, int64_t end) {
    Reader reader(steps, d, /*backward=*/false);
    for (int64_t m = begin; m < end; ++m)
      reader.Forward(c_data + m * d * d, q_data + m * d, h_data + m * d);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> h_bar, ffi::Span<const float> coefficients,
                    ffi::ResultBuffer<ffi::F32> c_bar, ffi::ResultBuffer<ffi::F32> q_bar) {
  int64_t count;
  int d;
  if (auto error = CheckShapes(c, q, &count, &d, coefficients); error.failure()) return error;
  const std::vector<Step> steps = Steps(coefficients);
  const float* c_data = c.typed_data();
  const float* q_data = q.typed_data();
  const float* hb_data = h_bar.typed_data();
  float* cb_data = c_bar->typed_data();
  float* qb_data = q_bar->typed_data();
  ParallelFor(pool, count, [&](int64_t begin, int64_t end) {
    Reader reader(steps, d, /*backward=*/true);
    for (int64_t m = begin; m < end; ++m)
      reader.Backward(c_data + m * d * d, q_data + m * d, hb_data + m * d, cb_data + m * d * d,
                      qb_data + m * d);
  });
  return ffi::Error::Success();
}

// ---- The chunk read: each position's memory formed inside the kernel ----
//
// The chunkwise mLSTM (orthorecall.mlstm) reads R(C_t)ᵀq_t at every position t of a chunk
// of L from C_t = scale_t C0 + Σ_s decay[t, s] k_s v_sᵀ. Formed by XLA, the L memories
// of every (batch, head) go to memory and come back, forward and backward, and that
// traffic cost more than the reads themselves (NS5 training step, v80/s512, batch 16:
// 0.77 of 1.78 s). Here each C_t is formed in cache, read and dropped; backward forms
// it again and turns its cotangent into those of scale, decay, k, v and C0 at once.

// Sum of a[i] b[i] over count floats, in eight partial sums (a single chain of
// dependent additions would bound the speed).
inline float Dot(const float* a, const float* b, int count) {
  float partial[8] = {};
  int i = 0;
  for (; i + 8 <= count; i += 8)
    for (int lane = 0; lane < 8; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  for (; i < count; ++i) partial[0] += a[i] * b[i];
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

// memory = scale c0 + Σ_s decay_row[s] k_s v_sᵀ (d x d row-major; k, v are L x d); a
// source whose weight is exactly 0 is skipped (adds nothing, even if k_s or v_s is not
// finite: the chunkwise mLSTM passes finite values and exact zeros where it masks).
void FormMemory(const float* c0, float scale, const float* decay_row, const float* k,
                const float* v, int length, int d, float* memory) {
  for (int e = 0; e < d * d; ++e) memory[e] = scale * c0[e];
  for (int s = 0; s < length; ++s) {
    // The masked (future, other-segment) sources of the chunkwise form weigh exactly 0.
    if (decay_row[s] == 0.0f) continue;
    const float* ks = k + s * d;
    const float* vs = v + s * d;
    for (int i = 0; i < d; ++i) {
      const float weight = decay_row[s] * ks[i];
      float* row = memory + i * d;
      for (int j = 0; j < d; ++j) row[j] += weight * vs[j];
    }
  }
}

struct ChunkShape {
  int64_t count;  // (batch, head) pairs
  int length;     // L
  int d;
};

ffi::Error CheckChunkShapes(ffi::Buffer<ffi::F32>& c0, ffi::Buffer<ffi::F32>& scale,
                            ffi::Buffer<ffi::F32>& decay, ffi::Buffer<ffi::F32>& k,
                            ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::F32>& q,
                            ffi::Span<const float> coefficients, ChunkShape* shape) {
  auto c_dims = c0.dimensions();
  auto q_dims = q.dimensions();
  if (c_dims.size() < 2 || c_dims[c_dims.size() - 1] != c_dims[c_dims.size() - 2])
    return ffi::Error::InvalidArgument("chunk_read: memory must be (..., d, d)");
  const int64_t d = c_dims[c_dims.size() - 1];
  if (q_dims.size() < 2 || q_dims[q_dims.size() - 1] != d)
    return ffi::Error::InvalidArgument("chunk_read: queries must be (..., L, d)");
  const int64_t length = q_dims[q_dims.size() - 2];
  const int64_t count = c0.element_count() / (d * d);
  if (q.element_count() != count * length * d || k.element_count() != q.element_count() ||
      v.element_count() != q.element_count() || scale.element_count() != count * length ||
      decay.element_count() != count * length * length)
    return ffi::Error::InvalidArgument(
        "chunk_read: operands must be (..., d, d), (..., L), (..., L, L) and three (..., L, d)");
  if (coefficients.size() % 3 != 0)
    return ffi::Error::InvalidArgument("chunk_read: coefficients must be (a, b, c) triples");
  *shape = {count, static_cast<int>(length), static_cast<int>(d)};
  return ffi::Error::Success();
}

ffi::Error ChunkForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> decay,
                        ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> q,
                        ffi::Span<const float> coefficients, ffi::ResultBuffer<ffi::F32> h) {
  ChunkShape shape;
  if (auto error = CheckChunkShapes(c0, scale, decay, k, v, q, coefficients, &shape);
      error.failure())
    return error;
  const std::vector<Step> steps = Steps(coefficients);
  const int L = shape.length, d = shape.d;
  const float *c0_data = c0.typed_data(), *scale_data = scale.typed_data(),
              *decay_data = decay.typed_data(), *k_data = k.typed_data(),
              *v_data = v.typed_data(), *q_data = q.typed_data();
  float* h_data = h->typed_data();
  ParallelFor(pool, shape.count, [&](int64_t begin, int64_t end) {
    Reader reader(steps, d, /*backward=*/false);
    AlignedBuffer memory(static_cast<size_t>(d) * d);
    for (int64_t m = begin; m < end; ++m) {
      const float* km = k_data + m * L * d;
      const float* vm = v_data + m * L * d;
      for (int t = 0; t < L; ++t) {
        const int64_t position = m * L + t;
        FormMemory(c0_data + m * d * d, scale_data[position], decay_data + position * L, km, vm,
                   L, d, memory.data());
        reader.Forward(memory.data(), q_data + position * d, h_data + position * d);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ChunkBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c0,
                         ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> decay,
                         ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                         ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> h_bar,
                         ffi::Span<const float> coefficients, ffi::ResultBuffer<ffi::F32> c0_bar,
                         ffi::ResultBuffer<ffi::F32> scale_bar,
                         ffi::ResultBuffer<ffi::F32> decay_bar, ffi::ResultBuffer<ffi::F32> k_bar,
                         ffi::ResultBuffer<ffi::F32> v_bar, ffi::ResultBuffer<ffi::F32> q_bar) {
  ChunkShape shape;
  if (auto error = CheckChunkShapes(c0, scale, decay, k, v, q, coefficients, &shape);
      error.failure())
    return error;
  const std::vector<Step> steps = Steps(coefficients);
  const int L = shape.length, d = shape.d;
  const float *c0_data = c0.typed_data(), *scale_data = scale.typed_data(),
              *decay_data = decay.typed_data(), *k_data = k.typed_data(),
              *v_data = v.typed_data(), *q_data = q.typed_data(), *hb_data = h_bar.typed_data();
  float *c0b_data = c0_bar->typed_data(), *sb_data = scale_bar->typed_data(),
        *db_data = decay_bar->typed_data(), *kb_data = k_bar->typed_data(),
        *vb_data = v_bar->typed_data(), *qb_data = q_bar->typed_data();
  ParallelFor(pool, shape.count, [&](int64_t begin, int64_t end) {
    Reader reader(steps, d, /*backward=*/true);
    const size_t area = static_cast<size_t>(d) * d;
    AlignedBuffer memory(area), memory_bar(area), transposed(area), u(d), w(d);
    for (int64_t m = begin; m < end; ++m) {
      const float* c0m = c0_data + m * d * d;
      const float* km = k_data + m * L * d;
      const float* vm = v_data + m * L * d;
      float* c0b = c0b_data + m * d * d;
      float* kb = kb_data + m * L * d;
      float* vb = vb_data + m * L * d;
      std::memset(c0b, 0, sizeof(float) * area);
      std::memset(kb, 0, sizeof(float) * L * d);
      std::memset(vb, 0, sizeof(float) * L * d);
      for (int t = 0; t < L; ++t) {
        const int64_t position = m * L + t;
        const float* decay_row = decay_data + position * L;
        FormMemory(c0m, scale_data[position], decay_row, km, vm, L, d, memory.data());
        reader.Backward(memory.data(), q_data + position * d, hb_data + position * d,
                        memory_bar.data(), qb_data + position * d);
        const float* cb = memory_bar.data();
        // C_t = scale_t C0 + Σ_s decay[t, s] k_s v_sᵀ.
        sb_data[position] = Dot(cb, c0m, d * d);
        const float scale_t = scale_data[position];
        for (size_t e = 0; e < area; ++e) c0b[e] += scale_t * cb[e];
        for (int i = 0; i < d; ++i)
          for (int j = 0; j < d; ++j) transposed.data()[j * d + i] = cb[i * d + j];
        for (int s = 0; s < L; ++s) {
          const float* ks = km + s * d;
          const float* vs = vm + s * d;
          // u = C̄ᵀk_s and w = C̄ v_s, both as sums of rows.
          std::memset(u.data(), 0, sizeof(float) * d);
          std::memset(w.data(), 0, sizeof(float) * d);
          for (int i = 0; i < d; ++i) {
            const float ki = ks[i], vi = vs[i];
            const float* row = cb + i * d;
            const float* column = transposed.data() + i * d;
            for (int j = 0; j < d; ++j) {
              u.data()[j] += ki * row[j];
              w.data()[j] += vi * column[j];
            }
          }
          db_data[position * L + s] = Dot(u.data(), vs, d);
          const float weight = decay_row[s];
          if (weight == 0.0f) continue;  // as in FormMemory
          for (int j = 0; j < d; ++j) {
            kb[s * d + j] += weight * w.data()[j];
            vb[s * d + j] += weight * u.data()[j];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// 1 when the kernel reads these (a, b, c) triples through the Gram matrix, 0 when it runs
// the explicit iteration: lets tests check which algorithm a coefficient set gets.
extern "C" int OrthorecallNsReadUsesGram(const float* coefficients, int count, int d) {
  std::vector<Step> steps;
  for (int i = 0; i + 2 < count; i += 3)
    steps.push_back({coefficients[i], coefficients[i + 1], coefficients[i + 2]});
  return UseGram(steps, d) ? 1 : 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthorecallNsReadForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const float>>("coefficients")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthorecallNsReadBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const float>>("coefficients")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthorecallChunkReadForward, ChunkForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // decay
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Attr<ffi::Span<const float>>("coefficients")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthorecallChunkReadBackward, ChunkBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // decay
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h̄
                                  .Attr<ffi::Span<const float>>("coefficients")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // C̄0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // scalē
                                  .Ret<ffi::Buffer<ffi::F32>>()   // decaȳ
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k̄
                                  .Ret<ffi::Buffer<ffi::F32>>()   // v̄
                                  .Ret<ffi::Buffer<ffi::F32>>());  // q̄
