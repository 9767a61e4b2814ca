// ifjax CPU kernel: a direct 2-D convolution, NHWC input, HWIO kernel, float32, for x86 CPUs
// with AVX-512. XLA:CPU reaches 190-340 GFLOP/s on ResNet18's 3x3 convolutions on a 2-core
// Zen 5 machine; this kernel keeps a block of 6 output pixels x 64 output channels in 24
// vector registers and streams the kernel's taps and input channels through them, which
// reaches 320-430 GFLOP/s on the same shapes (bench/README.md).
//
//   y[n, oh, ow, o] = sum_{kh, kw, c} xp[n, oh * sh + kh, ow * sw + kw, c] * w[kh, kw, c, o]
//
// where xp is x zero-padded by (top, bottom, left, right). Every output element is one
// float32 sum over (kh, kw, c) in that order.
//
// Work: per image (or, for small batches, per image and block of 64 output channels), on
// XLA's intra-op thread pool: the image is copied into a zero-padded scratch buffer that
// stays in cache, then every block of output pixels is computed for every block of output
// channels (the kernel packed once per call as [block][kh][kw][c][64]).
//
// Built on first use by models/_native.py against the XLA FFI headers shipped with jaxlib;
// registered as the XLA custom call "ifjax_conv2d". The AVX-512 code is compiled with a
// target attribute, so the library builds and loads on any x86-64 compiler and CPU;
// IfjaxConvSupported() says whether this CPU can run it (Python falls back to XLA if not).

// -DIFJAX_NO_AVX512 builds the portable stub (what non-x86 compilers get; used by a test).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(IFJAX_NO_AVX512)
#define IFJAX_X86 1
#include <immintrin.h>
#else
#define IFJAX_X86 0
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if IFJAX_X86

bool Supported();

constexpr int64_t kBlock = 64;  // output channels per block: 4 vectors of 16 floats

struct Geometry {
  int64_t n, h, w, c;              // input
  int64_t kh, kw, o;               // kernel (kh, kw, c, o)
  int64_t sh, sw, top, left;       // strides, leading padding
  int64_t oh, ow;                  // output map
  int64_t hp, wp;                  // padded input map (the scratch buffer)
  bool padded;                     // whether any padding is non-zero
};

#define IFJAX_AVX512 __attribute__((target("avx512f,fma")))

// R output pixels (offsets `offs` into the padded image x) x NV vectors of output channels.
template <int R, int NV>
IFJAX_AVX512 inline void Micro(const float* x, const int64_t* offs, const float* wpk, float* y,
                               const Geometry& g, __mmask16 last) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* xr[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) xr[r] = x + offs[r];
  const float* wp = wpk;
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t shift = (i * g.wp + j) * g.c;
      for (int64_t c = 0; c < g.c; ++c) {
        __m512 wv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wp + 16 * v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m512 xb = _mm512_set1_ps(xr[r][shift + c]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xb, wv[v], acc[r][v]);
        }
        wp += 16 * NV;
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* out = y + r * g.o + 16 * v;
      if (v == NV - 1) {
        _mm512_mask_storeu_ps(out, last, acc[r][v]);
      } else {
        _mm512_storeu_ps(out, acc[r][v]);
      }
    }
}

// All `count` output pixels of one image for one block of NV vectors of output channels.
template <int R, int NV>
IFJAX_AVX512 void Pixels(const float* x, const int64_t* offs, const float* wpk, float* y,
                         const Geometry& g, __mmask16 last, int64_t count) {
  int64_t p = 0;
  for (; p + R <= count; p += R) Micro<R, NV>(x, offs + p, wpk, y + p * g.o, g, last);
  switch (count - p) {  // the rest, fewer than R pixels, in one call
#define IFJAX_REST(k)                                                               \
  case k:                                                                           \
    if constexpr (k < R) Micro<k, NV>(x, offs + p, wpk, y + p * g.o, g, last);      \
    break;
    IFJAX_REST(1) IFJAX_REST(2) IFJAX_REST(3) IFJAX_REST(4) IFJAX_REST(5) IFJAX_REST(6)
    IFJAX_REST(7) IFJAX_REST(8) IFJAX_REST(9) IFJAX_REST(10) IFJAX_REST(11)
#undef IFJAX_REST
    default:
      break;
  }
}

IFJAX_AVX512 void Block(const float* x, const int64_t* offs, const float* wpk, float* y,
                        const Geometry& g, int64_t block) {
  const int64_t o0 = block * kBlock, width = std::min(kBlock, g.o - o0);
  const int nv = static_cast<int>((width + 15) / 16);
  const int rest = static_cast<int>(width - 16 * (nv - 1));
  const __mmask16 last = static_cast<__mmask16>((1u << rest) - 1);
  const float* w = wpk + g.kh * g.kw * g.c * o0;
  const int64_t count = g.oh * g.ow;
  switch (nv) {
    case 4: Pixels<6, 4>(x, offs, w, y + o0, g, last, count); break;
    case 3: Pixels<8, 3>(x, offs, w, y + o0, g, last, count); break;
    case 2: Pixels<12, 2>(x, offs, w, y + o0, g, last, count); break;
    default: Pixels<12, 1>(x, offs, w, y + o0, g, last, count); break;
  }
}

// fn(i) for i in [0, items) on `workers` threads of XLA's pool, the caller included. Work
// is claimed item by item, and the caller waits only for items another thread has
// claimed, so a task that starts late (its thread busy elsewhere) finds nothing left and
// returns without touching `fn`: no deadlock, no use after return.
template <typename F>
void ParallelFor(ffi::ThreadPool* pool, int64_t items, int64_t workers, const F& fn) {
  workers = std::max<int64_t>(1, std::min(workers, items));
  if (workers == 1 || pool == nullptr) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto drain = [state, items, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < items;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < workers; ++t) pool->Schedule([drain]() { drain(); });
  drain();
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

void Pack(const float* w, float* wpk, const Geometry& g, int64_t block) {
  const int64_t taps = g.kh * g.kw * g.c;
  const int64_t o0 = block * kBlock, width = std::min(kBlock, g.o - o0);
  const int64_t stride = (width + 15) / 16 * 16;
  float* dst = wpk + taps * o0;
  for (int64_t t = 0; t < taps; ++t) {
    std::memcpy(dst + t * stride, w + t * g.o + o0, width * sizeof(float));
    std::fill(dst + t * stride + width, dst + (t + 1) * stride, 0.f);
  }
}

// Copies image n of x into the interior of the zeroed scratch image xp.
void Pad(const float* x, float* xp, const Geometry& g, int64_t n) {
  const float* src = x + n * g.h * g.w * g.c;
  for (int64_t i = 0; i < g.h; ++i) {
    std::memcpy(xp + ((g.top + i) * g.wp + g.left) * g.c, src + i * g.w * g.c,
                g.w * g.c * sizeof(float));
  }
}

void Conv(const float* x, const float* w, float* y, const Geometry& g, ffi::ThreadPool* pool,
          int64_t workers) {
  const int64_t blocks = (g.o + kBlock - 1) / kBlock;
  std::vector<float> wpk(g.kh * g.kw * g.c * blocks * kBlock);
  ParallelFor(pool, blocks, workers, [&](int64_t b) { Pack(w, wpk.data(), g, b); });
  std::vector<int64_t> offs(g.oh * g.ow);
  for (int64_t i = 0; i < g.oh; ++i)
    for (int64_t j = 0; j < g.ow; ++j) offs[i * g.ow + j] = (i * g.sh * g.wp + j * g.sw) * g.c;
  // One item per image, or per (image, channel block) when there are few images.
  const bool split = blocks > 1 && g.n < 4 * workers;
  const int64_t items = split ? g.n * blocks : g.n;
  const int64_t image = g.hp * g.wp * g.c;
  ParallelFor(pool, items, workers, [&](int64_t item) {
    const int64_t n = split ? item / blocks : item;
    const float* xn = x + n * image;
    thread_local std::vector<float> scratch;
    thread_local std::array<int64_t, 7> scratch_for{};  // the geometry its zero border is for
    if (g.padded) {
      const std::array<int64_t, 7> key{g.h, g.w, g.c, g.hp, g.wp, g.top, g.left};
      if (scratch_for != key) {  // a fresh zeroed buffer for this geometry
        scratch.assign(image, 0.f);
        scratch_for = key;
      }
      Pad(x, scratch.data(), g, n);
      xn = scratch.data();
    }
    float* yn = y + n * g.oh * g.ow * g.o;
    if (split) {
      Block(xn, offs.data(), wpk.data(), yn, g, item % blocks);
    } else {
      for (int64_t b = 0; b < blocks; ++b) Block(xn, offs.data(), wpk.data(), yn, g, b);
    }
  });
}

ffi::Error Conv2d(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t sh, int64_t sw, int64_t top,
                  int64_t bottom, int64_t left, int64_t right) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("ifjax_conv2d: rank-4 NHWC input and HWIO kernel only");
  Geometry g{};
  g.n = xd[0], g.h = xd[1], g.w = xd[2], g.c = xd[3];
  g.kh = wd[0], g.kw = wd[1], g.o = wd[3];
  g.sh = sh, g.sw = sw, g.top = top, g.left = left;
  g.hp = g.h + top + bottom, g.wp = g.w + left + right;
  g.oh = (g.hp - g.kh) / sh + 1, g.ow = (g.wp - g.kw) / sw + 1;
  g.padded = top || bottom || left || right;
  if (wd[2] != g.c || sh < 1 || sw < 1 || top < 0 || bottom < 0 || left < 0 || right < 0 ||
      g.hp < g.kh || g.wp < g.kw || yd[0] != g.n || yd[1] != g.oh || yd[2] != g.ow ||
      yd[3] != g.o)
    return ffi::Error::InvalidArgument("ifjax_conv2d: inconsistent shapes");
  if (!Supported())
    return ffi::Error::InvalidArgument("ifjax_conv2d: this CPU has no AVX-512");
  if (g.n == 0 || g.o == 0) return ffi::Error::Success();
  if (g.c == 0 || g.kh == 0 || g.kw == 0) {
    std::fill(y->typed_data(), y->typed_data() + g.n * g.oh * g.ow * g.o, 0.f);
    return ffi::Error::Success();
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  Conv(x.typed_data(), w.typed_data(), y->typed_data(), g, &pool, workers);
  return ffi::Error::Success();
}

bool Supported() { return __builtin_cpu_supports("avx512f"); }

#else  // not x86-64: the library still builds (for the transpose kernel)

ffi::Error Conv2d(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                  ffi::Result<ffi::Buffer<ffi::F32>>, int64_t, int64_t, int64_t, int64_t,
                  int64_t, int64_t) {
  return ffi::Error::InvalidArgument("ifjax_conv2d: built for x86-64 with AVX-512 only");
}

bool Supported() { return false; }

#endif  // IFJAX_X86

}  // namespace

extern "C" int IfjaxConvSupported() { return Supported() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(IfjaxConv2d, Conv2d,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("bottom")
                                  .Attr<int64_t>("left")
                                  .Attr<int64_t>("right"));
