// Convolutions for XLA:CPU as XLA FFI custom calls, each one SGEMM per kernel tap and block of pixels.
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

struct Shared {
  Problem pb;
  int64_t num_blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::vector<std::vector<float>> partial;   // one per helper; empty if that helper did no block
  std::vector<char> used;
};

// Claims and runs blocks until none are left. Weight gradient: blocks accumulate into `acc`, allocated
// in `own` on the first claim when null (helpers); the forward writes disjoint rows of Y directly.
void Work(Shared& sh, float* acc, std::vector<float>* own, char* used) {
  int prev = 0;
  bool first = true;
  const int single = 1;
  for (int64_t b; (b = sh.next.fetch_add(1)) < sh.num_blocks;) {
    if (first) {
      if (g_set_threads != nullptr) prev = g_set_threads(&single);
      if (acc == nullptr && !sh.pb.forward) {
        own->assign(sh.pb.kh * sh.pb.kw * sh.pb.cin * sh.pb.cout, 0.0f);
        acc = own->data();
        *used = 1;
      }
    }
    const int64_t p0 = b * sh.pb.rows, n = std::min(sh.pb.rows, sh.pb.k - p0);
    if (sh.pb.forward) {
      ForwardBlock(sh.pb, p0, n);
    } else {
      WeightGradBlock(sh.pb, p0, n, first, acc);
    }
    first = false;
    sh.finished.fetch_add(1, std::memory_order_release);
  }
  if (!first && g_set_threads != nullptr) g_set_threads(&prev);
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

// Runs all blocks on the caller and the helper threads. For the weight gradient, `out` receives the sum
// of the per-thread accumulators.
void Run(std::shared_ptr<Shared> sh, float* out, int64_t out_size) {
  sh->num_blocks = (sh->pb.k + sh->pb.rows - 1) / sh->pb.rows;
  HelperPool& pool = HelperPool::Get();
  // XLA may run another call at the same time (a layer's input and weight gradients are independent);
  // then both use helpers. Giving helpers only to a call running alone measured the same (4.57 vs 4.46 s
  // per training step, alternating steps), so the simpler rule stays.
  const int64_t helpers = std::min<int64_t>(pool.size(), sh->num_blocks - 1);
  sh->partial.resize(helpers);
  sh->used.assign(helpers, 0);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([sh, h] { Work(*sh, nullptr, &sh->partial[h], &sh->used[h]); });
  }
  if (!sh->pb.forward) std::memset(out, 0, out_size * sizeof(float));   // in case helpers take every block
  Work(*sh, sh->pb.forward ? nullptr : out, nullptr, nullptr);
  while (sh->finished.load(std::memory_order_acquire) < sh->num_blocks) std::this_thread::yield();
  if (sh->pb.forward) return;
  for (int64_t h = 0; h < helpers; ++h) {
    if (!sh->used[h]) continue;
    const float* p = sh->partial[h].data();
    for (int64_t i = 0; i < out_size; ++i) out[i] += p[i];
  }
}

ffi::Error ConvWeightGradImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                              int64_t sy, int64_t sx, int64_t ho, int64_t wo) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_conv_weight_grad: no BLAS loaded");
  auto wd = dw->dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("diffssr_conv_weight_grad: the result must be rank 4");
  auto sh = std::make_shared<Shared>();
  std::string err = Setup(xs.dimensions(), dy.dimensions(), wd[0], wd[1], wd[2], wd[3], sy, sx, ho, wo, sh->pb);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_conv_weight_grad: " + err);
  sh->pb.x = xs.typed_data();
  sh->pb.dy = dy.typed_data();
  sh->pb.forward = false;
  Run(sh, dw->typed_data(), wd[0] * wd[1] * wd[2] * wd[3]);
  return ffi::Error::Success();
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                           int64_t sy, int64_t sx, int64_t ho, int64_t wo) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("diffssr_conv_forward: no BLAS loaded");
  auto wd = w.dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("diffssr_conv_forward: the kernel must be rank 4");
  auto sh = std::make_shared<Shared>();
  std::string err = Setup(xs.dimensions(), y->dimensions(), wd[0], wd[1], wd[2], wd[3], sy, sx, ho, wo, sh->pb);
  if (!err.empty()) return ffi::Error::InvalidArgument("diffssr_conv_forward: " + err);
  sh->pb.x = xs.typed_data();
  sh->pb.w = w.typed_data();
  sh->pb.y = y->typed_data();
  sh->pb.forward = true;
  // Grid rows past the last real output are never computed; zero them so the buffer is defined.
  const int64_t total = y->element_count() / sh->pb.cout;
  std::memset(sh->pb.y + sh->pb.k * sh->pb.cout, 0, (total - sh->pb.k) * sh->pb.cout * sizeof(float));
  Run(sh, nullptr, 0);
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
