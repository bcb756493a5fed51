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
// Winograd F(2x2, 3x3) (Lavin & Gray 2016) for 3x3 stride-1 VALID convs with even output sizes: per 2x2
// output tile, Y = A^T [U (.) V] A with V = B^T d B (d: the 4x4 input tile) and U = G g G^T, so the 16
// elementwise products become 16 GEMMs over (tiles x Cin) @ (Cin x Cout): 2.25x fewer multiplies than the
// direct conv. U (and, for the weight gradient, G^T dU G) are computed by the caller (tiny); here:
//   forward:          M_xi = V_xi @ U_xi per block of tiles, then the output transform;
//   weight gradient:  dU_xi += V_xi^T @ dM_xi, dM = A dY A^T (the 2x2 output-gradient tile -> 4x4).
// Layouts: x [B, Hp, Wp, Cin], U / dU [16, Cin, Cout], y / dy [B, Hp - 2, Wp - 2, Cout]; xi = 4 * i + j.
struct Wino {
  const float* x;
  const float* u;
  const float* dy;
  float* y;
  int64_t h, w, pad, ho, wo, cin, cout, th, tw, tiles, block;
  bool reflect;
};

// Distance between the 16 planes of a block's transformed tiles: n * c rounded up to a cache line plus
// one more, so that the 16 streams a transform reads or writes at once do not all map to the same L1
// set (plain n * c is often a multiple of 4 KiB: 16 streams in 12 ways thrashed, 3x slower transforms).
inline int64_t PlaneStride(int64_t n, int64_t c) { return (n * c + 15) / 16 * 16 + 16; }

float* Scratch(int64_t size) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < size) buf.resize(size);
  return buf.data();
}

// V[xi][t][c] = (B^T d B)[i][j] for the n tiles from t0.
void InputTransform(const Wino& w, int64_t t0, int64_t n, float* __restrict v) {
  const int64_t cin = w.cin, plane = PlaneStride(n, cin);
  thread_local std::vector<float> zeros;
  if (static_cast<int64_t>(zeros.size()) < cin) zeros.assign(cin, 0.0f);
  // Padded coordinate -> source row / column, or -1 for a zero of the padding.
  auto source = [&](int64_t i, int64_t size) -> int64_t {
    if (i >= 0 && i < size) return i;
    if (!w.reflect) return -1;
    return i < 0 ? -i : 2 * (size - 1) - i;
  };
  for (int64_t t = 0; t < n; ++t) {
    const int64_t g = t0 + t, img = g / (w.th * w.tw), r = g % (w.th * w.tw);
    const int64_t y0 = 2 * (r / w.tw) - w.pad, x0 = 2 * (r % w.tw) - w.pad;
    const float* p[4][4];
    for (int i = 0; i < 4; ++i) {
      const int64_t sy = source(y0 + i, w.h);
      for (int j = 0; j < 4; ++j) {
        const int64_t sx = source(x0 + j, w.w);
        p[i][j] = (sy < 0 || sx < 0) ? zeros.data() : w.x + ((img * w.h + sy) * w.w + sx) * cin;
      }
    }
    float* __restrict out = v + t * cin;
#pragma GCC ivdep
    for (int64_t c = 0; c < cin; ++c) {
      float d[4][4], e[4][4];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) d[i][j] = p[i][j][c];
      }
      for (int j = 0; j < 4; ++j) {   // B^T d: rows
        e[0][j] = d[0][j] - d[2][j];
        e[1][j] = d[1][j] + d[2][j];
        e[2][j] = d[2][j] - d[1][j];
        e[3][j] = d[1][j] - d[3][j];
      }
      for (int i = 0; i < 4; ++i) {   // (.) B: columns
        out[(4 * i + 0) * plane + c] = e[i][0] - e[i][2];
        out[(4 * i + 1) * plane + c] = e[i][1] + e[i][2];
        out[(4 * i + 2) * plane + c] = e[i][2] - e[i][1];
        out[(4 * i + 3) * plane + c] = e[i][1] - e[i][3];
      }
    }
  }
}

// y tile = A^T M A for the n tiles from t0.
void OutputTransform(const Wino& w, int64_t t0, int64_t n, const float* __restrict m) {
  const int64_t cout = w.cout, wo = w.wo, ho = w.ho, rs = wo * cout, plane = PlaneStride(n, cout);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t g = t0 + t, img = g / (w.th * w.tw), r = g % (w.th * w.tw);
    float* __restrict base = w.y + ((img * ho + 2 * (r / w.tw)) * wo + 2 * (r % w.tw)) * cout;
    const float* __restrict in = m + t * cout;
#pragma GCC ivdep
    for (int64_t c = 0; c < cout; ++c) {
      float s[2][4];
      for (int j = 0; j < 4; ++j) {
        const float a0 = in[j * plane + c], a1 = in[(4 + j) * plane + c], a2 = in[(8 + j) * plane + c],
                    a3 = in[(12 + j) * plane + c];
        s[0][j] = a0 + a1 + a2;
        s[1][j] = a1 - a2 - a3;
      }
      for (int i = 0; i < 2; ++i) {
        base[i * rs + c] = s[i][0] + s[i][1] + s[i][2];
        base[i * rs + cout + c] = s[i][1] - s[i][2] - s[i][3];
      }
    }
  }
}

// dM[xi][t][c] = (A dY A^T)[i][j] for the n tiles from t0 (A = [[1, 0], [1, 1], [1, -1], [0, -1]]).
void GradTransform(const Wino& w, int64_t t0, int64_t n, float* __restrict dm) {
  const int64_t cout = w.cout, wo = w.wo, ho = w.ho, rs = wo * cout, plane = PlaneStride(n, cout);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t g = t0 + t, img = g / (w.th * w.tw), r = g % (w.th * w.tw);
    const float* __restrict base = w.dy + ((img * ho + 2 * (r / w.tw)) * wo + 2 * (r % w.tw)) * cout;
    float* __restrict out = dm + t * cout;
#pragma GCC ivdep
    for (int64_t c = 0; c < cout; ++c) {
      const float g00 = base[c], g01 = base[cout + c], g10 = base[rs + c], g11 = base[rs + cout + c];
      const float e[4][2] = {{g00, g01}, {g00 + g10, g01 + g11}, {g00 - g10, g01 - g11}, {-g10, -g11}};
      for (int i = 0; i < 4; ++i) {
        out[(4 * i + 0) * plane + c] = e[i][0];
        out[(4 * i + 1) * plane + c] = e[i][0] + e[i][1];
        out[(4 * i + 2) * plane + c] = e[i][0] - e[i][1];
        out[(4 * i + 3) * plane + c] = -e[i][1];
      }
    }
  }
}

void WinoForwardBlock(const Wino& w, int64_t t0, int64_t n) {
  const int64_t pv = PlaneStride(n, w.cin), pm = PlaneStride(n, w.cout);
  float* v = Scratch(16 * (pv + pm));
  float* m = v + 16 * pv;
  InputTransform(w, t0, n, v);
  const float one = 1.0f, zero = 0.0f;
  const int mm = static_cast<int>(w.cout), nn = static_cast<int>(n), kk = static_cast<int>(w.cin);
  for (int xi = 0; xi < 16; ++xi) {   // column-major: M_xi^T [Cout, n] = U_xi^T [Cout, Cin] @ V_xi^T [Cin, n]
    g_sgemm("N", "N", &mm, &nn, &kk, &one, w.u + xi * w.cin * w.cout, &mm, v + xi * pv, &kk, &zero, m + xi * pm, &mm,
            1, 1);
  }
  OutputTransform(w, t0, n, m);
}

void WinoWeightGradBlock(const Wino& w, int64_t t0, int64_t n, bool first, float* acc) {
  const int64_t pv = PlaneStride(n, w.cin), pm = PlaneStride(n, w.cout);
  float* v = Scratch(16 * (pv + pm));
  float* dm = v + 16 * pv;
  InputTransform(w, t0, n, v);
  GradTransform(w, t0, n, dm);
  const float one = 1.0f, beta = first ? 0.0f : 1.0f;
  const int mm = static_cast<int>(w.cout), nn = static_cast<int>(w.cin), kk = static_cast<int>(n);
  for (int xi = 0; xi < 16; ++xi) {   // column-major: dU_xi^T [Cout, Cin] += dM_xi^T [Cout, n] @ V_xi [n, Cin]
    g_sgemm("N", "T", &mm, &nn, &kk, &one, dm + xi * pm, &mm, v + xi * pv, &nn, &beta,
            acc + xi * w.cin * w.cout, &mm, 1, 1);
  }
}

// Checks shapes (x [B, H, W, Cin], padded by `pad` on every side, zeros or reflected; grid
// [B, H + 2 pad - 2, W + 2 pad - 2, Cout] with even sizes) and fills `w`.
std::string WinoSetup(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> gd, int64_t ucin, int64_t ucout,
                      int64_t pad, int64_t reflect, Wino& w) {
  if (xd.size() != 4 || gd.size() != 4) return "expected rank-4 input and output";
  const int64_t batch = xd[0], h = xd[1], wd = xd[2], cin = xd[3], cout = gd[3];
  const int64_t ho = h + 2 * pad - 2, wo = wd + 2 * pad - 2;
  if (pad < 0 || pad > 2 || (reflect && (pad > 1 || h < 2 || wd < 2)) || gd[0] != batch || gd[1] != ho ||
      gd[2] != wo || ho < 2 || wo < 2 || ho % 2 || wo % 2 || ucin != cin || ucout != cout) {
    return "inconsistent shapes (needs a 3x3 conv with even output height and width)";
  }
  w.h = h;
  w.w = wd;
  w.pad = pad;
  w.reflect = reflect != 0;
  w.ho = ho;
  w.wo = wo;
  w.cin = cin;
  w.cout = cout;
  w.th = ho / 2;
  w.tw = wo / 2;
  w.tiles = batch * w.th * w.tw;
  // ~1.5 MB of transformed tiles (V and M) per block: they stay in L2 between the transforms and the GEMMs.
  w.block = std::clamp<int64_t>(24576 / (cin + cout), 16, 1024);
  return "";
}

std::shared_ptr<Job> WinoJob(const Wino& w, bool forward) {
  auto job = std::make_shared<Job>();
  job->num_blocks = (w.tiles + w.block - 1) / w.block;
  job->acc_size = forward ? 0 : 16 * w.cin * w.cout;
  job->block = [w, forward](int64_t b, float* acc, bool first) {
    const int64_t t0 = b * w.block, n = std::min(w.block, w.tiles - t0);
    if (forward) {
      WinoForwardBlock(w, t0, n);
    } else {
      WinoWeightGradBlock(w, t0, n, first, acc);
    }
  };
  return job;
}

// U[a][b] = sum_kl G[a][k] G[b][l] g[k][l] for every (Cin, Cout) pair; g [3, 3, Cin, Cout], or with
// `flip` the input-gradient kernel of a conv whose kernel is g: g[2 - k][2 - l] with Cin and Cout
// swapped (g then [3, 3, Cout, Cin]).
void KernelTransform(const float* g, int64_t cin, int64_t cout, bool flip, float* __restrict u) {
  const int64_t n = cin * cout;
  std::vector<float> tap;
  if (flip) {   // tap[k][l][i][o] = g[2 - k][2 - l][o][i]
    tap.resize(9 * n);
    for (int64_t k = 0; k < 9; ++k) {
      const float* src = g + (8 - k) * n;
      for (int64_t o = 0; o < cout; ++o) {
        for (int64_t i = 0; i < cin; ++i) tap[k * n + i * cout + o] = src[o * cin + i];
      }
    }
    g = tap.data();
  }
  std::vector<float> rows(12 * n);   // rows[a][l] = sum_k G[a][k] g[k][l]
  for (int64_t l = 0; l < 3; ++l) {
    const float* g0 = g + l * n;
    const float* g1 = g + (3 + l) * n;
    const float* g2 = g + (6 + l) * n;
    float* r = rows.data();
    for (int64_t e = 0; e < n; ++e) {
      r[(0 * 3 + l) * n + e] = g0[e];
      r[(1 * 3 + l) * n + e] = 0.5f * (g0[e] + g1[e] + g2[e]);
      r[(2 * 3 + l) * n + e] = 0.5f * (g0[e] - g1[e] + g2[e]);
      r[(3 * 3 + l) * n + e] = g2[e];
    }
  }
  for (int64_t a = 0; a < 4; ++a) {
    const float* r0 = rows.data() + (a * 3) * n;
    const float* r1 = r0 + n;
    const float* r2 = r1 + n;
    float* ua = u + 4 * a * n;
    for (int64_t e = 0; e < n; ++e) {
      ua[e] = r0[e];
      ua[n + e] = 0.5f * (r0[e] + r1[e] + r2[e]);
      ua[2 * n + e] = 0.5f * (r0[e] - r1[e] + r2[e]);
      ua[3 * n + e] = r2[e];
    }
  }
}

// g[k][l] = sum_ab G[a][k] G[b][l] dU[a][b] (the transpose of `KernelTransform`, no flip).
void KernelGradTransform(const float* du, int64_t n, float* __restrict g) {
  std::vector<float> rows(12 * n);   // rows[k][b] = sum_a G[a][k] dU[a][b]
  for (int64_t b = 0; b < 4; ++b) {
    const float* d0 = du + b * n;
    const float* d1 = du + (4 + b) * n;
    const float* d2 = du + (8 + b) * n;
    const float* d3 = du + (12 + b) * n;
    for (int64_t e = 0; e < n; ++e) {
      rows[(0 * 4 + b) * n + e] = d0[e] + 0.5f * (d1[e] + d2[e]);
      rows[(1 * 4 + b) * n + e] = 0.5f * (d1[e] - d2[e]);
      rows[(2 * 4 + b) * n + e] = d3[e] + 0.5f * (d1[e] + d2[e]);
    }
  }
  for (int64_t k = 0; k < 3; ++k) {
    const float* r0 = rows.data() + (k * 4) * n;
    const float* r1 = r0 + n;
    const float* r2 = r1 + n;
    const float* r3 = r2 + n;
    float* gk = g + 3 * k * n;
    for (int64_t e = 0; e < n; ++e) {
      gk[e] = r0[e] + 0.5f * (r1[e] + r2[e]);
      gk[n + e] = 0.5f * (r1[e] - r2[e]);
      gk[2 * n + e] = r3[e] + 0.5f * (r1[e] + r2[e]);
    }
  }
}

ffi::Error WinoForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> y,
                           int64_t pad, int64_t reflect, int64_t flip) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_wino_forward: no BLAS loaded");
  auto gd = g.dimensions();
  if (gd.size() != 4 || gd[0] != 3 || gd[1] != 3) {
    return ffi::Error::InvalidArgument("diffssr_wino_forward: the kernel must be [3, 3, Cin, Cout]");
  }
  const int64_t cin = flip ? gd[3] : gd[2], cout = flip ? gd[2] : gd[3];
  Wino w{};
  std::string err = WinoSetup(x.dimensions(), y->dimensions(), cin, cout, pad, reflect, w);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_wino_forward: " + err);
  std::vector<float> u(16 * cin * cout);
  KernelTransform(g.typed_data(), cin, cout, flip != 0, u.data());
  w.x = x.typed_data();
  w.u = u.data();
  w.y = y->typed_data();
  Run(WinoJob(w, true), nullptr);
  return ffi::Error::Success();
}

ffi::Error WinoWeightGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dg,
                              int64_t pad, int64_t reflect) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_wino_weight_grad: no BLAS loaded");
  auto gd = dg->dimensions();
  if (gd.size() != 4 || gd[0] != 3 || gd[1] != 3) {
    return ffi::Error::InvalidArgument("diffssr_wino_weight_grad: the result must be [3, 3, Cin, Cout]");
  }
  Wino w{};
  std::string err = WinoSetup(x.dimensions(), dy.dimensions(), gd[2], gd[3], pad, reflect, w);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_wino_weight_grad: " + err);
  w.x = x.typed_data();
  w.dy = dy.typed_data();
  std::vector<float> du(16 * w.cin * w.cout);
  Run(WinoJob(w, false), du.data());
  KernelGradTransform(du.data(), w.cin * w.cout, dg->typed_data());
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
