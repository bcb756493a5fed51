// Convolutions for XLA:CPU as XLA FFI custom calls: direct convs as one SGEMM per kernel tap and block of
// pixels, and 3x3 stride-1 convs as Winograd F(2x2, 3x3) (16 SGEMMs per block of 2x2 tiles, see below
// `Wino`: 2.25x fewer multiplies, 1.4-2x faster than the direct form on the U-Net's and RRDB's shapes).
//
// Why: XLA:CPU runs the weight gradient of a 3x3 conv (a product contracted over every batch and pixel
// position, with a small Cin x Cout result) at 25-65 GFLOP/s on 2 cores, and its convolutions on the
// RRDB's and the U-Net's middle levels' shapes at 95-155; MKL's SGEMM, blocked as below, runs the same
// work at 150-240. The SGEMM comes from the MKL inside PyTorch's CPU library (torch is already a
// dependency); `diffssr_jax/native/__init__.py` builds this file and passes that library's path.
//
// Layout (no im2col copy): the caller hands in the zero-padded input split by row phase,
//   xs[s, b, i, j, c] = x_padded[b, i * sy + s, j, c]   (shape [sy, B, Hs, Wp, Cin], Wp = sx * Wq)
// and an output (or output gradient) on the grid [B, Hs, Wq, Cout]. Flattening (b, i, j) of that grid
// into one row index p = (b * Hs + i) * Wq + j, the input pixel that tap (ky, kx) pairs with output p is
// row  (b * Hs + i + ky / sy) * Wp + sx * j + kx = sx * p + (ky / sy) * Wp + kx  of phase ky % sy: a
// matrix with constant row stride sx * Cin. So per tap
//   forward:          Y[p]    += X_tap[p] @ W_tap                     (Y on the whole grid)
//   weight gradient:  dW_tap  += X_tap^T @ dY     summed over p       (dY zero off the real outputs)
// Grid positions that are not real outputs (j >= Wo, i >= Ho) compute garbage the caller slices off
// (forward) or multiply zeros (gradient); p stops at the last real output, so no read leaves the buffers.
//
// Blocking and threads: rows p are processed in blocks small enough that the block's rows of X and Y/dY
// stay in L2 while every tap uses them. Blocks are handed out dynamically to the calling thread and to
// helper threads (`HelperPool`); for the weight gradient each thread accumulates into its own
// [kh, kw, Cin, Cout] buffer, summed at the end. MKL runs single-threaded inside (its OpenMP threads
// competing with XLA's slowed both: measured 5.5 -> 4.5 s per training step). The caller never waits
// for a helper that has not started, so it cannot deadlock; helpers that start late find no work left.
// The Winograd handlers share this machinery (`Job`, `Run`) with blocks of tiles instead of rows.

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Fortran BLAS sgemm_ (column-major), with the two hidden string-length arguments of the Fortran ABI.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*, const int*,
                         std::size_t, std::size_t);
// MKL's mkl_set_num_threads_local (Fortran ABI: the count by pointer); returns the previous setting.
using SetThreadsFn = int (*)(const int*);

SgemmFn g_sgemm = nullptr;
SetThreadsFn g_set_threads = nullptr;


struct Problem {
  const float* x;    // phase-split padded input [sy, B, Hs, Wp, Cin]
  const float* w;    // forward: kernel [kh, kw, Cin, Cout]
  const float* dy;   // weight gradient: output gradient on the grid [B, Hs, Wq, Cout]
  float* y;          // forward: output on the grid [B, Hs, Wq, Cout]
  int64_t phase_size, wp, cin, cout, kh, kw, sy, sx, k, rows;
  bool forward;

  const float* XTap(int64_t ky, int64_t kx, int64_t p0) const {
    return x + (ky % sy) * phase_size + ((ky / sy) * wp + kx + sx * p0) * cin;
  }
};

// One block of rows [p0, p0 + n) for every tap, accumulated into acc ([kh, kw, Cin, Cout] row-major,
// i.e. per tap column-major [Cout, Cin]): acc_tap^T += dY_block^T @ X_tap_block.
void WeightGradBlock(const Problem& pb, int64_t p0, int64_t n, bool first, float* acc) {
  const float one = 1.0f, beta = first ? 0.0f : 1.0f;
  const int m = static_cast<int>(pb.cout), nn = static_cast<int>(pb.cin), kk = static_cast<int>(n);
  const int lda = static_cast<int>(pb.cout), ldb = static_cast<int>(pb.sx * pb.cin), ldc = m;
  for (int64_t ky = 0; ky < pb.kh; ++ky) {
    for (int64_t kx = 0; kx < pb.kw; ++kx) {
      float* c = acc + (ky * pb.kw + kx) * pb.cin * pb.cout;
      g_sgemm("N", "T", &m, &nn, &kk, &one, pb.dy + p0 * pb.cout, &lda, pb.XTap(ky, kx, p0), &ldb, &beta, c, &ldc,
              1, 1);
    }
  }
}

// Forward, rows [p0, p0 + n) of the grid output: Y_block^T = sum over taps W_tap^T @ X_tap_block^T
// (column-major [Cout, n]; row-major that is Y_block[n, Cout]).
void ForwardBlock(const Problem& pb, int64_t p0, int64_t n) {
  const float one = 1.0f, zero = 0.0f;
  const int m = static_cast<int>(pb.cout), nn = static_cast<int>(n), kk = static_cast<int>(pb.cin);
  const int lda = m, ldb = static_cast<int>(pb.sx * pb.cin), ldc = m;
  for (int64_t ky = 0; ky < pb.kh; ++ky) {
    for (int64_t kx = 0; kx < pb.kw; ++kx) {
      const float* wt = pb.w + (ky * pb.kw + kx) * pb.cin * pb.cout;
      const float* beta = (ky == 0 && kx == 0) ? &zero : &one;
      g_sgemm("N", "N", &m, &nn, &kk, &one, wt, &lda, pb.XTap(ky, kx, p0), &ldb, beta, pb.y + p0 * pb.cout, &ldc,
              1, 1);
    }
  }
}

// Helper threads of our own, created on first use and kept (sleeping when idle). XLA's intra-op pool was
// tried first: inside a training step its threads were mostly busy, helpers ran only 22% of the blocks
// and the calls took 2x longer than in isolation.
class HelperPool {
 public:
  static HelperPool& Get() {
    static HelperPool* pool = new HelperPool();   // never destroyed: threads may outlive static teardown
    return *pool;
  }
  int size() const { return static_cast<int>(threads_.size()); }
  void Schedule(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  HelperPool() {
    unsigned n = std::thread::hardware_concurrency();
    for (unsigned i = 1; i < std::max(n, 2u); ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }
  void Loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
};

// One call's work: `num_blocks` independent blocks, run by `block(index, acc, first)`. With
// acc_size > 0 every thread accumulates into a buffer of its own (`acc`; `first`: its first block, which
// overwrites instead of adding) and the buffers are summed into the call's result at the end.
struct Job {
  int64_t num_blocks = 0;
  int64_t acc_size = 0;
  std::function<void(int64_t, float*, bool)> block;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::vector<std::vector<float>> partial;   // one per helper; empty if that helper did no block
  std::vector<char> used;
};

// Claims and runs blocks until none are left; `acc` is the caller's accumulator (null for helpers, which
// allocate `own` on their first claim).
void Work(Job& job, float* acc, std::vector<float>* own, char* used) {
  int prev = 0;
  bool first = true;
  const int single = 1;
  for (int64_t b; (b = job.next.fetch_add(1)) < job.num_blocks;) {
    if (first) {
      if (g_set_threads != nullptr) prev = g_set_threads(&single);
      if (acc == nullptr && job.acc_size > 0) {
        own->assign(job.acc_size, 0.0f);
        acc = own->data();
        *used = 1;
      }
    }
    job.block(b, acc, first);
    first = false;
    job.finished.fetch_add(1, std::memory_order_release);
  }
  if (!first && g_set_threads != nullptr) g_set_threads(&prev);
}

// Runs all blocks on the caller and the helper threads; with acc_size > 0, `out` (acc_size floats)
// receives the sum of the per-thread accumulators.
void Run(std::shared_ptr<Job> job, float* out) {
  HelperPool& pool = HelperPool::Get();
  // XLA may run another call at the same time (a layer's input and weight gradients are independent);
  // then both use helpers. Giving helpers only to a call running alone measured the same (4.57 vs 4.46 s
  // per training step, alternating steps), so the simpler rule stays.
  const int64_t helpers = std::min<int64_t>(pool.size(), job->num_blocks - 1);
  job->partial.resize(std::max<int64_t>(helpers, 0));
  job->used.assign(std::max<int64_t>(helpers, 0), 0);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([job, h] { Work(*job, nullptr, &job->partial[h], &job->used[h]); });
  }
  if (job->acc_size > 0) std::memset(out, 0, job->acc_size * sizeof(float));   // in case helpers take every block
  Work(*job, job->acc_size > 0 ? out : nullptr, nullptr, nullptr);
  while (job->finished.load(std::memory_order_acquire) < job->num_blocks) std::this_thread::yield();
  for (int64_t h = 0; h < helpers; ++h) {
    if (!job->used[h]) continue;
    const float* p = job->partial[h].data();
    for (int64_t i = 0; i < job->acc_size; ++i) out[i] += p[i];
  }
}

// Checks shapes, fills the problem (everything but the data pointers) and returns an error message or "".
std::string Setup(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> gd, int64_t kh, int64_t kw, int64_t kcin,
                  int64_t kcout, int64_t sy, int64_t sx, int64_t ho, int64_t wo, Problem& pb) {
  if (xd.size() != 5 || gd.size() != 4) return "expected a rank-5 phase-split input and a rank-4 grid";
  const int64_t batch = xd[1], hs = xd[2], wp = xd[3], cin = xd[4];
  const int64_t wq = gd[2], cout = gd[3];
  if (sy < 1 || sx < 1 || xd[0] != sy || gd[0] != batch || gd[1] != hs || wp != sx * wq || kcin != cin ||
      kcout != cout || kh < 1 || kw < 1 || ho < 1 || wo < 1 || ho > hs || wo > wq ||
      (ho - 1) + (kh - 1) / sy >= hs || sx * (wo - 1) + (kw - 1) >= wp) {
    return "inconsistent shapes";
  }
  pb.phase_size = batch * hs * wp * cin;
  pb.wp = wp;
  pb.cin = cin;
  pb.cout = cout;
  pb.kh = kh;
  pb.kw = kw;
  pb.sy = sy;
  pb.sx = sx;
  pb.k = ((batch - 1) * hs + (ho - 1)) * wq + wo;   // grid rows up to the last real output pixel
  // ~1 MB of rows of X and Y/dY per block (L2 is 2 MB per core here); at least 256 rows for GEMM efficiency.
  pb.rows = std::clamp<int64_t>((int64_t{1} << 18) / (cout + sx * cin), 256, 1 << 16);
  return "";
}

std::shared_ptr<Job> DirectJob(const Problem& pb) {
  auto job = std::make_shared<Job>();
  job->num_blocks = (pb.k + pb.rows - 1) / pb.rows;
  job->acc_size = pb.forward ? 0 : pb.kh * pb.kw * pb.cin * pb.cout;
  job->block = [pb](int64_t b, float* acc, bool first) {
    const int64_t p0 = b * pb.rows, n = std::min(pb.rows, pb.k - p0);
    if (pb.forward) {
      ForwardBlock(pb, p0, n);
    } else {
      WeightGradBlock(pb, p0, n, first, acc);
    }
  };
  return job;
}

// ---------------------------------------------------------------------------------------------------
// Winograd minimal filtering F(m x m, r x r) (Lavin & Gray 2016) for stride-1 convs: per m x m output
// tile, Y = A^T [U (.) V] A with V = B^T d B (d: the a x a input tile, a = m + r - 1) and U = G g G^T, so
// the a^2 elementwise products over channels become a^2 GEMMs over (tiles x Cin) @ (Cin x Cout):
//   F(2x2, 3x3): 16 products per 4 outputs instead of 36 (2.25x fewer multiplies), the 3x3 convs;
//   F(2x2, 2x2): 9 instead of 16 (1.78x), the 2x2 convs of the transposed convs' sub-pixel form.
// Per block of tiles:
//   forward:          M_xi = V_xi @ U_xi, then the output transform;
//   weight gradient:  dU_xi += V_xi^T @ dM_xi with dM = A dY A^T, and at the end g = G^T dU G.
// The input's padding (zeros, or ReflectionPad2d(1)) is read in place, never materialised; output tiles
// that reach past an odd output size read zeros from dY and write their extra outputs to a scratch row.
// Layouts: x [B, H, W, Cin], kernel [r, r, Cin, Cout], y / dy [B, H + 2 pad - r + 1, ..., Cout]; the
// transformed tiles of a block are a^2 planes [n, C], xi = a * i + j.

// F(2x2, 3x3), the usual matrices (interpolation points 0, 1, -1, infinity).
struct F23 {
  static constexpr int m = 2, r = 3, a = 4;
  static constexpr float bt[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float g[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float at[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// F(2x2, 2x2): y0 = (d0 - d1) g0 + d1 (g0 + g1), y1 = d1 (g0 + g1) + (d2 - d1) g1 (all coefficients exact).
struct F22 {
  static constexpr int m = 2, r = 2, a = 3;
  static constexpr float bt[3][3] = {{1, -1, 0}, {0, 1, 0}, {0, -1, 1}};
  static constexpr float g[3][2] = {{1, 0}, {1, 1}, {0, 1}};
  static constexpr float at[2][3] = {{1, 1, 0}, {0, 1, 1}};
};

struct Wino {
  const float* x;
  const float* u;
  const float* dy;
  float* y;
  int64_t h, w, pad, ho, wo, cin, cout, th, tw, tiles, block;
  bool reflect;
};

// Distance between the planes of a block's transformed tiles: n * c rounded up to a cache line plus one
// more, so that the planes a transform reads or writes at once do not all map to the same L1 set (plain
// n * c is often a multiple of 4 KiB: 16 streams in 12 ways thrashed, 3x slower transforms).
inline int64_t PlaneStride(int64_t n, int64_t c) { return (n * c + 15) / 16 * 16 + 16; }

// sum_k coef[k] * x[k] with the coefficients known at compile time once the loops are unrolled: zero
// terms vanish (x * 0 is not foldable in IEEE arithmetic, hence the test), +-1 need no multiply.
template <int K>
inline float Combine(const float (&coef)[K], const float (&x)[K]) {
  float s = 0.0f;
  bool first = true;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    if (coef[k] == 0.0f) continue;
    const float term = coef[k] == 1.0f ? x[k] : (coef[k] == -1.0f ? -x[k] : coef[k] * x[k]);
    s = first ? term : s + term;
    first = false;
  }
  return s;
}

float* Scratch(int64_t size) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < size) buf.resize(size);
  return buf.data();
}

// A row of `c` zeros (reads of padding) and a row to write discarded outputs to, per thread.
const float* ZeroRow(int64_t c) {
  thread_local std::vector<float> zeros;
  if (static_cast<int64_t>(zeros.size()) < c) zeros.assign(c, 0.0f);
  return zeros.data();
}
float* DiscardRow(int64_t c) {
  thread_local std::vector<float> sink;
  if (static_cast<int64_t>(sink.size()) < c) sink.resize(c);
  return sink.data();
}

// Tile index -> (image, first output row, first output column).
inline void TileOrigin(const Wino& w, int64_t g, int64_t m, int64_t& img, int64_t& oy, int64_t& ox) {
  img = g / (w.th * w.tw);
  const int64_t r = g % (w.th * w.tw);
  oy = m * (r / w.tw);
  ox = m * (r % w.tw);
}

// Padded coordinate -> source row / column of x, or -1 where the padding (or a ragged tile) reads zero.
inline int64_t Source(const Wino& w, int64_t i, int64_t size) {
  if (i >= 0 && i < size) return i;
  if (!w.reflect) return -1;
  const int64_t j = i < 0 ? -i : 2 * (size - 1) - i;
  return (j >= 0 && j < size) ? j : -1;
}

// V[xi][t][c] = (B^T d B)[i][j] for the n tiles from t0.
template <class F>
void InputTransform(const Wino& w, int64_t t0, int64_t n, float* __restrict v) {
  constexpr int a = F::a;
  const int64_t cin = w.cin, plane = PlaneStride(n, cin);
  const float* zeros = ZeroRow(cin);
  for (int64_t t = 0; t < n; ++t) {
    int64_t img, oy, ox;
    TileOrigin(w, t0 + t, F::m, img, oy, ox);
    const float* p[a][a];
    for (int i = 0; i < a; ++i) {
      const int64_t sy = Source(w, oy - w.pad + i, w.h);
      for (int j = 0; j < a; ++j) {
        const int64_t sx = Source(w, ox - w.pad + j, w.w);
        p[i][j] = (sy < 0 || sx < 0) ? zeros : w.x + ((img * w.h + sy) * w.w + sx) * cin;
      }
    }
    float* __restrict out = v + t * cin;
#pragma GCC ivdep
    for (int64_t c = 0; c < cin; ++c) {
      float col[a][a];   // col[j][k] = d[k][j]
#pragma GCC unroll 8
      for (int k = 0; k < a; ++k) {
#pragma GCC unroll 8
        for (int j = 0; j < a; ++j) col[j][k] = p[k][j][c];
      }
      float e[a][a];     // e[i][j] = (B^T d)[i][j]
#pragma GCC unroll 8
      for (int i = 0; i < a; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < a; ++j) e[i][j] = Combine(F::bt[i], col[j]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < a; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < a; ++j) out[(a * i + j) * plane + c] = Combine(F::bt[j], e[i]);
      }
    }
  }
}

// y tile = A^T M A for the n tiles from t0 (outputs past an odd edge go to a discard row).
template <class F>
void OutputTransform(const Wino& w, int64_t t0, int64_t n, const float* __restrict m) {
  constexpr int a = F::a, mm = F::m;
  const int64_t cout = w.cout, plane = PlaneStride(n, cout);
  float* sink = DiscardRow(cout);
  for (int64_t t = 0; t < n; ++t) {
    int64_t img, oy, ox;
    TileOrigin(w, t0 + t, mm, img, oy, ox);
    float* q[mm][mm];
    for (int i = 0; i < mm; ++i) {
      for (int j = 0; j < mm; ++j) {
        const bool ok = oy + i < w.ho && ox + j < w.wo;
        q[i][j] = ok ? w.y + ((img * w.ho + oy + i) * w.wo + ox + j) * cout : sink;
      }
    }
    const float* __restrict in = m + t * cout;
#pragma GCC ivdep
    for (int64_t c = 0; c < cout; ++c) {
      float col[a][a];   // col[j][k] = M[k][j]
#pragma GCC unroll 8
      for (int k = 0; k < a; ++k) {
#pragma GCC unroll 8
        for (int j = 0; j < a; ++j) col[j][k] = in[(a * k + j) * plane + c];
      }
      float s[mm][a];    // s[i][j] = (A^T M)[i][j]
#pragma GCC unroll 8
      for (int i = 0; i < mm; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < a; ++j) s[i][j] = Combine(F::at[i], col[j]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < mm; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < mm; ++j) q[i][j][c] = Combine(F::at[j], s[i]);
      }
    }
  }
}

// dM[xi][t][c] = (A dY A^T)[i][j] for the n tiles from t0 (dY read as zero past an odd edge).
template <class F>
void GradTransform(const Wino& w, int64_t t0, int64_t n, float* __restrict dm) {
  constexpr int a = F::a, mm = F::m;
  const int64_t cout = w.cout, plane = PlaneStride(n, cout);
  const float* zeros = ZeroRow(cout);
  // A itself (a x m): A[i][k] = A^T[k][i], rows usable as `Combine` coefficients.
  struct Matrix { float v[a][mm]; };
  static constexpr Matrix amat = [] {
    Matrix t{};
    for (int i = 0; i < a; ++i) {
      for (int k = 0; k < mm; ++k) t.v[i][k] = F::at[k][i];
    }
    return t;
  }();
  for (int64_t t = 0; t < n; ++t) {
    int64_t img, oy, ox;
    TileOrigin(w, t0 + t, mm, img, oy, ox);
    const float* q[mm][mm];
    for (int i = 0; i < mm; ++i) {
      for (int j = 0; j < mm; ++j) {
        const bool ok = oy + i < w.ho && ox + j < w.wo;
        q[i][j] = ok ? w.dy + ((img * w.ho + oy + i) * w.wo + ox + j) * cout : zeros;
      }
    }
    float* __restrict out = dm + t * cout;
#pragma GCC ivdep
    for (int64_t c = 0; c < cout; ++c) {
      float col[mm][mm];   // col[j][k] = dY[k][j]
#pragma GCC unroll 8
      for (int k = 0; k < mm; ++k) {
#pragma GCC unroll 8
        for (int j = 0; j < mm; ++j) col[j][k] = q[k][j][c];
      }
      float e[a][mm];      // e[i][j] = (A dY)[i][j]
#pragma GCC unroll 8
      for (int i = 0; i < a; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < mm; ++j) e[i][j] = Combine(amat.v[i], col[j]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < a; ++i) {
#pragma GCC unroll 8
        for (int l = 0; l < a; ++l) out[(a * i + l) * plane + c] = Combine(amat.v[l], e[i]);
      }
    }
  }
}

template <class F>
void WinoForwardBlock(const Wino& w, int64_t t0, int64_t n) {
  constexpr int a2 = F::a * F::a;
  const int64_t pv = PlaneStride(n, w.cin), pm = PlaneStride(n, w.cout);
  float* v = Scratch(a2 * (pv + pm));
  float* m = v + a2 * pv;
  InputTransform<F>(w, t0, n, v);
  const float one = 1.0f, zero = 0.0f;
  const int mm = static_cast<int>(w.cout), nn = static_cast<int>(n), kk = static_cast<int>(w.cin);
  for (int xi = 0; xi < a2; ++xi) {   // column-major: M_xi^T [Cout, n] = U_xi^T [Cout, Cin] @ V_xi^T [Cin, n]
    g_sgemm("N", "N", &mm, &nn, &kk, &one, w.u + xi * w.cin * w.cout, &mm, v + xi * pv, &kk, &zero, m + xi * pm, &mm,
            1, 1);
  }
  OutputTransform<F>(w, t0, n, m);
}

template <class F>
void WinoWeightGradBlock(const Wino& w, int64_t t0, int64_t n, bool first, float* acc) {
  constexpr int a2 = F::a * F::a;
  const int64_t pv = PlaneStride(n, w.cin), pm = PlaneStride(n, w.cout);
  float* v = Scratch(a2 * (pv + pm));
  float* dm = v + a2 * pv;
  InputTransform<F>(w, t0, n, v);
  GradTransform<F>(w, t0, n, dm);
  const float one = 1.0f, beta = first ? 0.0f : 1.0f;
  const int mm = static_cast<int>(w.cout), nn = static_cast<int>(w.cin), kk = static_cast<int>(n);
  for (int xi = 0; xi < a2; ++xi) {   // column-major: dU_xi^T [Cout, Cin] += dM_xi^T [Cout, n] @ V_xi [n, Cin]
    g_sgemm("N", "T", &mm, &nn, &kk, &one, dm + xi * pm, &mm, v + xi * pv, &nn, &beta, acc + xi * w.cin * w.cout, &mm,
            1, 1);
  }
}

// The two kernel-side maps of Winograd, per (Cin, Cout) pair (n of them, contiguous): with to_u,
// U[a][b] = sum_kl G[a][k] G[b][l] g[k][l] (src [r, r, n] -> dst [a, a, n]); else its transpose, the
// weight gradient g[k][l] = sum_ab G[a][k] G[b][l] dU[a][b] (src [a, a, n] -> dst [r, r, n]).
template <class F, bool to_u>
void KernelMap(const float* src, int64_t n, float* __restrict dst) {
  constexpr int out_side = to_u ? F::a : F::r, in_side = to_u ? F::r : F::a;
  for (int p = 0; p < out_side; ++p) {
    for (int q = 0; q < out_side; ++q) {
      float* d = dst + (out_side * p + q) * n;
      std::fill(d, d + n, 0.0f);
      for (int s = 0; s < in_side; ++s) {
        for (int t = 0; t < in_side; ++t) {
          const float coef = to_u ? F::g[p][s] * F::g[q][t] : F::g[s][p] * F::g[t][q];
          if (coef == 0.0f) continue;
          const float* v = src + (in_side * s + t) * n;
          for (int64_t e = 0; e < n; ++e) d[e] += coef * v[e];
        }
      }
    }
  }
}

// U from the kernel g [r, r, Cin, Cout]; with `flip` g is the kernel [r, r, Cout, Cin] of a conv whose
// input gradient this is, read as g[r-1-k][r-1-l] with Cin and Cout swapped.
template <class F>
void KernelTransform(const float* g, int64_t cin, int64_t cout, bool flip, float* __restrict u) {
  constexpr int r = F::r;
  const int64_t n = cin * cout;
  std::vector<float> tap;
  if (flip) {   // tap[k][l][i][o] = g[r-1-k][r-1-l][o][i]
    tap.resize(r * r * n);
    for (int64_t k = 0; k < r * r; ++k) {
      const float* src = g + (r * r - 1 - k) * n;
      for (int64_t o = 0; o < cout; ++o) {
        for (int64_t i = 0; i < cin; ++i) tap[k * n + i * cout + o] = src[o * cin + i];
      }
    }
    g = tap.data();
  }
  KernelMap<F, true>(g, n, u);
}

// Checks shapes (x [B, H, W, Cin] padded by `pad` on every side, zeros or reflected; grid
// [B, H + 2 pad - r + 1, W + 2 pad - r + 1, Cout]) and fills `w`.
std::string WinoSetup(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> gd, int64_t r, int64_t ucin,
                      int64_t ucout, int64_t pad, int64_t reflect, Wino& w) {
  if (xd.size() != 4 || gd.size() != 4) return "expected rank-4 input and output";
  const int64_t batch = xd[0], h = xd[1], wd = xd[2], cin = xd[3], cout = gd[3];
  const int64_t ho = h + 2 * pad - r + 1, wo = wd + 2 * pad - r + 1;
  if (pad < 0 || pad > r - 1 || (reflect && (pad != 1 || h < 2 || wd < 2)) || gd[0] != batch || gd[1] != ho ||
      gd[2] != wo || ho < 1 || wo < 1 || ucin != cin || ucout != cout) {
    return "inconsistent shapes";
  }
  w.h = h;
  w.w = wd;
  w.pad = pad;
  w.reflect = reflect != 0;
  w.ho = ho;
  w.wo = wo;
  w.cin = cin;
  w.cout = cout;
  w.th = (ho + 1) / 2;
  w.tw = (wo + 1) / 2;
  w.tiles = batch * w.th * w.tw;
  // ~1.5 MB of transformed tiles (V and M) per block, so they stay in L2 between the transforms and the
  // GEMMs; but wide layers (the condition projection's 384 -> 1024: 14 MB of transformed kernel) need
  // more tiles per block to pay for streaming the kernel (forward) or the accumulator (weight gradient)
  // through every block: at least Cin Cout / (Cin + Cout) tiles, i.e. as many bytes of tiles as of kernel.
  w.block = std::clamp<int64_t>(std::max(24576 / (cin + cout), cin * cout / (cin + cout)), 64, 1024);
  return "";
}

template <class F>
std::shared_ptr<Job> WinoJob(const Wino& w, bool forward) {
  auto job = std::make_shared<Job>();
  job->num_blocks = (w.tiles + w.block - 1) / w.block;
  job->acc_size = forward ? 0 : F::a * F::a * w.cin * w.cout;
  job->block = [w, forward](int64_t b, float* acc, bool first) {
    const int64_t t0 = b * w.block, n = std::min(w.block, w.tiles - t0);
    if (forward) {
      WinoForwardBlock<F>(w, t0, n);
    } else {
      WinoWeightGradBlock<F>(w, t0, n, first, acc);
    }
  };
  return job;
}

template <class F>
void WinoForward(Wino& w, const float* kernel, bool flip) {
  std::vector<float> u(F::a * F::a * w.cin * w.cout);
  KernelTransform<F>(kernel, w.cin, w.cout, flip, u.data());
  w.u = u.data();
  Run(WinoJob<F>(w, true), nullptr);
}

template <class F>
void WinoWeightGrad(const Wino& w, float* kernel_grad) {
  std::vector<float> du(F::a * F::a * w.cin * w.cout);
  Run(WinoJob<F>(w, false), du.data());
  KernelMap<F, false>(du.data(), w.cin * w.cout, kernel_grad);
}

ffi::Error WinoForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> y,
                           int64_t pad, int64_t reflect, int64_t flip) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_wino_forward: no BLAS loaded");
  auto gd = g.dimensions();
  if (gd.size() != 4 || gd[0] != gd[1] || gd[0] < 2 || gd[0] > 3) {
    return ffi::Error::InvalidArgument("diffssr_wino_forward: the kernel must be [r, r, Cin, Cout] with r = 2 or 3");
  }
  const int64_t cin = flip ? gd[3] : gd[2], cout = flip ? gd[2] : gd[3];
  Wino w{};
  std::string err = WinoSetup(x.dimensions(), y->dimensions(), gd[0], cin, cout, pad, reflect, w);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_wino_forward: " + err);
  w.x = x.typed_data();
  w.y = y->typed_data();
  if (gd[0] == 3) {
    WinoForward<F23>(w, g.typed_data(), flip != 0);
  } else {
    WinoForward<F22>(w, g.typed_data(), flip != 0);
  }
  return ffi::Error::Success();
}

ffi::Error WinoWeightGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dg,
                              int64_t pad, int64_t reflect) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_wino_weight_grad: no BLAS loaded");
  auto gd = dg->dimensions();
  if (gd.size() != 4 || gd[0] != gd[1] || gd[0] < 2 || gd[0] > 3) {
    return ffi::Error::InvalidArgument("diffssr_wino_weight_grad: the result must be [r, r, Cin, Cout] with r = 2 or 3");
  }
  Wino w{};
  std::string err = WinoSetup(x.dimensions(), dy.dimensions(), gd[0], gd[2], gd[3], pad, reflect, w);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_wino_weight_grad: " + err);
  w.x = x.typed_data();
  w.dy = dy.typed_data();
  if (gd[0] == 3) {
    WinoWeightGrad<F23>(w, dg->typed_data());
  } else {
    WinoWeightGrad<F22>(w, dg->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error ConvWeightGradImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                              int64_t sy, int64_t sx, int64_t ho, int64_t wo) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_conv_weight_grad: no BLAS loaded");
  auto wd = dw->dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("diffssr_conv_weight_grad: the result must be rank 4");
  Problem pb{};
  std::string err = Setup(xs.dimensions(), dy.dimensions(), wd[0], wd[1], wd[2], wd[3], sy, sx, ho, wo, pb);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_conv_weight_grad: " + err);
  pb.x = xs.typed_data();
  pb.dy = dy.typed_data();
  pb.forward = false;
  Run(DirectJob(pb), dw->typed_data());
  return ffi::Error::Success();
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                           int64_t sy, int64_t sx, int64_t ho, int64_t wo) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_conv_forward: no BLAS loaded");
  auto wd = w.dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("diffssr_conv_forward: the kernel must be rank 4");
  Problem pb{};
  std::string err = Setup(xs.dimensions(), y->dimensions(), wd[0], wd[1], wd[2], wd[3], sy, sx, ho, wo, pb);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_conv_forward: " + err);
  pb.x = xs.typed_data();
  pb.w = w.typed_data();
  pb.y = y->typed_data();
  pb.forward = true;
  // Grid rows past the last real output are never computed; zero them so the buffer is defined.
  const int64_t total = y->element_count() / pb.cout;
  std::memset(pb.y + pb.k * pb.cout, 0, (total - pb.k) * pb.cout * sizeof(float));
  Run(DirectJob(pb), nullptr);
  return ffi::Error::Success();
}

}  // namespace

// Loads `sgemm_` (and MKL's per-thread thread-count setter, if present) from the shared library at
// `path`. Returns 0 on success, 1 if the library does not load, 2 if it has no sgemm_.
extern "C" int diffssr_load_blas(const char* path) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return 1;
  void* fn = dlsym(lib, "sgemm_");
  if (fn == nullptr) return 2;
  g_set_threads = reinterpret_cast<SetThreadsFn>(dlsym(lib, "mkl_set_num_threads_local"));
  g_sgemm = reinterpret_cast<SgemmFn>(fn);
  return 0;
}

// Both handlers: (phase-split input, kernel or output gradient) -> result, with the same attributes.
static auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("sy")
      .Attr<int64_t>("sx")
      .Attr<int64_t>("ho")
      .Attr<int64_t>("wo");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffssrConvForward, ConvForwardImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffssrConvWeightGrad, ConvWeightGradImpl, Binding());

static auto WinoBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("pad")
      .Attr<int64_t>("reflect");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffssrWinoForward, WinoForwardImpl, WinoBinding().Attr<int64_t>("flip"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffssrWinoWeightGrad, WinoWeightGradImpl, WinoBinding());
