// steerjax CPU kernel: skinny matmuls for KV-cache decoding, as XLA FFI custom calls.
//
// y (M, N) = x (M, K) @ W for one layer l of a weight stack packed into column panels:
//   panels (L, P, K, 8), panels[l, p, k, j] = W_l[k, 8 p + j],  N = 8 P.
// Each panel is one contiguous K x 8 block, so a decode step streams every weight exactly once, in order
// (XLA CPU's GEMM repacks W on every call, and a strided 8-column walk of the (K, N) layout defeats the
// hardware prefetcher). A micro-kernel holds 8 rows x 8 columns of float32 accumulators in registers;
// weights are float32 or bfloat16 (widened exactly to float32), x and y float32, products accumulated in
// float32 in k order. Panels are split over XLA's intra-op thread pool.
//
// Built at first use by steerjax/cpu_kernels.py (g++ -O3 -march=native); see that module.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 8;        // columns per panel (one 8-float vector)
constexpr int64_t kRowBlock = 8;     // rows of x per micro-kernel call
constexpr int64_t kPanelsPerTask = 8;
constexpr int64_t kMinParallelMacs = 1 << 16;

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x8_unaligned __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x8_unaligned __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline f32x8 load_weights(const float* p) { return *reinterpret_cast<const f32x8_unaligned*>(p); }

inline f32x8 load_weights(const uint16_t* p) {  // bfloat16 -> float32 is a 16-bit left shift
  const u32x8 wide = __builtin_convertvector(*reinterpret_cast<const u16x8_unaligned*>(p), u32x8) << 16;
  f32x8 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline void store(float* p, f32x8 v) { *reinterpret_cast<f32x8_unaligned*>(p) = v; }

// Rows [0, R) of x (row stride K) times one K x 8 panel -> y columns [0, 8) (row stride N).
template <int R, typename W>
inline void micro_kernel(const float* __restrict x, int64_t K, const W* __restrict panel, float* __restrict y,
                         int64_t N) {
  f32x8 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = f32x8{};
  for (int64_t k = 0; k < K; ++k) {
    const f32x8 w = load_weights(panel + k * kPanel);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += x[r * K + k] * w;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) store(y + r * N, acc[r]);
}

template <typename W>
void panel_times_rows(const float* x, int64_t M, int64_t K, const W* panel, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock) micro_kernel<kRowBlock>(x + m * K, K, panel, y + m * N, N);
  const float* xr = x + m * K;
  float* yr = y + m * N;
  switch (M - m) {
    case 1: micro_kernel<1>(xr, K, panel, yr, N); break;
    case 2: micro_kernel<2>(xr, K, panel, yr, N); break;
    case 3: micro_kernel<3>(xr, K, panel, yr, N); break;
    case 4: micro_kernel<4>(xr, K, panel, yr, N); break;
    case 5: micro_kernel<5>(xr, K, panel, yr, N); break;
    case 6: micro_kernel<6>(xr, K, panel, yr, N); break;
    case 7: micro_kernel<7>(xr, K, panel, yr, N); break;
    default: break;
  }
}

struct TaskQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> running{0};
  int64_t tasks = 0;
};

// Runs body(t) for t in [0, tasks) on the caller and up to num_threads - 1 pool threads. The caller takes
// tasks too and never waits for a helper that has not started, so a busy pool cannot deadlock it.
template <typename F>
void run_tasks(ffi::ThreadPool& pool, int64_t tasks, bool parallel, F body) {
  auto queue = std::make_shared<TaskQueue>();
  queue->tasks = tasks;
  auto worker = [queue, body]() {
    queue->running.fetch_add(1);
    for (int64_t t; (t = queue->next.fetch_add(1)) < queue->tasks;) body(t);
    queue->running.fetch_sub(1);
  };
  const int64_t helpers = parallel ? std::min<int64_t>(pool.num_threads(), tasks) - 1 : 0;
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = worker;
    pool.Schedule(std::move(task));
  }
  worker();
  while (queue->running.load() > 0) std::this_thread::yield();
}

template <ffi::DataType WT, typename W>
ffi::Error panel_matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WT> panels,
                        ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int64_t layers) {
  const auto pd = panels.dimensions();
  if (pd.size() < 4 || pd.back() != kPanel)
    return ffi::Error::InvalidArgument("panel_matmul: panels must be (L, P, K, 8)");
  const int64_t P = pd[pd.size() - 3], K = pd[pd.size() - 2], N = P * kPanel;
  if (panels.element_count() != layers * P * K * kPanel)
    return ffi::Error::InvalidArgument(
        "panel_matmul: the weight panels carry a batch axis (vmap over weights is not supported)");
  if (layer.element_count() != 1)
    return ffi::Error::InvalidArgument("panel_matmul: the layer index must be one integer (no vmap over it)");
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() != K) return ffi::Error::InvalidArgument("panel_matmul: x (..., K) does not match K");
  if (K == 0) {  // empty sums
    std::memset(y->untyped_data(), 0, y->element_count() * sizeof(float));
    return ffi::Error::Success();
  }
  const int64_t M = x.element_count() / K;
  if (y->element_count() != M * N) return ffi::Error::InvalidArgument("panel_matmul: output is not (..., N)");
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("panel_matmul: layer index out of range");

  const W* w = reinterpret_cast<const W*>(panels.untyped_data()) + static_cast<int64_t>(l) * P * K * kPanel;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t tasks = (P + kPanelsPerTask - 1) / kPanelsPerTask;
  run_tasks(pool, tasks, M * K * N >= kMinParallelMacs, [=](int64_t t) {
    const int64_t end = std::min(P, (t + 1) * kPanelsPerTask);
    for (int64_t p = t * kPanelsPerTask; p < end; ++p)
      panel_times_rows(xp, M, K, w + p * K * kPanel, yp + p * kPanel, N);
  });
  return ffi::Error::Success();
}

// The binding both weight dtypes share: thread pool; x, panels, layer; y; the stack's layer count.
template <ffi::DataType WT>
auto panel_matmul_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<WT>>()
      .template Arg<ffi::Buffer<ffi::S32>>()  // the builder's type depends on WT from here on
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<int64_t>("layers");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SteerjaxPanelMatmulF32, (panel_matmul<ffi::F32, float>),
                              panel_matmul_binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SteerjaxPanelMatmulBF16, (panel_matmul<ffi::BF16, uint16_t>),
                              panel_matmul_binding<ffi::BF16>());
