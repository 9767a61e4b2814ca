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
#include <string>
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

// The kernel's taps for output channels [64 * block, 64 * block + 64), as
// [kh][kw][c][64] (zero beyond g.o). With `flip`, w is the kernel of the convolution this
// one is the input gradient of, (kh, kw, g.o, g.c): taps are rotated by 180 degrees and the
// channel axes swapped.
void Pack(const float* w, float* wpk, const Geometry& g, int64_t block, bool flip) {
  const int64_t taps = g.kh * g.kw * g.c;
  const int64_t o0 = block * kBlock, width = std::min(kBlock, g.o - o0);
  const int64_t stride = (width + 15) / 16 * 16;
  float* dst = wpk + taps * o0;
  if (!flip) {
    for (int64_t t = 0; t < taps; ++t) {
      std::memcpy(dst + t * stride, w + t * g.o + o0, width * sizeof(float));
      std::fill(dst + t * stride + width, dst + (t + 1) * stride, 0.f);
    }
    return;
  }
  std::fill(dst, dst + taps * stride, 0.f);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* src = w + ((g.kh - 1 - i) * g.kw + (g.kw - 1 - j)) * g.o * g.c;
      float* tap = dst + (i * g.kw + j) * g.c * stride;
      for (int64_t q = 0; q < width; ++q) {
        const float* row = src + (o0 + q) * g.c;  // w[.., .., o0 + q, :] is contiguous
        for (int64_t c = 0; c < g.c; ++c) tap[c * stride + q] = row[c];
      }
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
          int64_t workers, bool flip) {
  const int64_t blocks = (g.o + kBlock - 1) / kBlock;
  std::vector<float> wpk(g.kh * g.kw * g.c * blocks * kBlock);
  ParallelFor(pool, blocks, workers, [&](int64_t b) { Pack(w, wpk.data(), g, b, flip); });
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

// ---------------------------------------------------------------------- kernel gradient
//
//   dw[i, j, c, o] = sum_{n, oh, ow} xp[n, oh * sh + i, ow * sw + j, c] * dy[n, oh, ow, o]
//
// A block of R input channels x NV vectors of output channels of one tap accumulates in
// registers over every output pixel of a chunk of images (about kChunkPixels pixels), then
// is added to dw. Work items are (range of images, block of 64 output channels); each range
// of images sums into its own copy of dw, and the copies are added in order at the end, so
// results do not depend on which thread ran what.

constexpr int64_t kChunkPixels = 128;

template <int R, int NV>
IFJAX_AVX512 inline void GradMicro(const float* xs, const float* dy, float* dw, const Geometry& g,
                                   int64_t images, __mmask16 last) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t image = g.hp * g.wp * g.c, out_image = g.oh * g.ow * g.o;
  const int64_t xstep = g.sw * g.c;
  for (int64_t n = 0; n < images; ++n) {
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      const float* xr = xs + n * image + oh * g.sh * g.wp * g.c;
      const float* dr = dy + n * out_image + oh * g.ow * g.o;
      for (int64_t ow = 0; ow < g.ow; ++ow, xr += xstep, dr += g.o) {
        __m512 d[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v)
          d[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, dr + 16 * v) : _mm512_loadu_ps(dr + 16 * v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m512 xb = _mm512_set1_ps(xr[r]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xb, d[v], acc[r][v]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* out = dw + r * g.o + 16 * v;
      if (v == NV - 1) {
        _mm512_mask_storeu_ps(out, last, _mm512_add_ps(_mm512_maskz_loadu_ps(last, out), acc[r][v]));
      } else {
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[r][v]));
      }
    }
}

// Every tap and input channel of one block of output channels, for a chunk of images.
template <int R, int NV>
IFJAX_AVX512 void GradChannels(const float* xs, const float* dy, float* dw, const Geometry& g,
                               int64_t images, __mmask16 last) {
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* xt = xs + (i * g.wp + j) * g.c;
      float* dt = dw + (i * g.kw + j) * g.c * g.o;
      int64_t c = 0;
      for (; c + R <= g.c; c += R) GradMicro<R, NV>(xt + c, dy, dt + c * g.o, g, images, last);
      switch (g.c - c) {  // the rest, fewer than R channels
#define IFJAX_REST(k)                                                                       \
  case k:                                                                                   \
    if constexpr (k < R) GradMicro<k, NV>(xt + c, dy, dt + c * g.o, g, images, last);       \
    break;
        IFJAX_REST(1) IFJAX_REST(2) IFJAX_REST(3) IFJAX_REST(4) IFJAX_REST(5) IFJAX_REST(6)
        IFJAX_REST(7) IFJAX_REST(8) IFJAX_REST(9) IFJAX_REST(10) IFJAX_REST(11)
#undef IFJAX_REST
        default:
          break;
      }
    }
  }
}

IFJAX_AVX512 void GradBlock(const float* xs, const float* dy, float* dw, const Geometry& g,
                            int64_t images, int64_t block) {
  const int64_t o0 = block * kBlock, width = std::min(kBlock, g.o - o0);
  const int nv = static_cast<int>((width + 15) / 16);
  const int rest = static_cast<int>(width - 16 * (nv - 1));
  const __mmask16 last = static_cast<__mmask16>((1u << rest) - 1);
  switch (nv) {
    case 4: GradChannels<6, 4>(xs, dy + o0, dw + o0, g, images, last); break;
    case 3: GradChannels<8, 3>(xs, dy + o0, dw + o0, g, images, last); break;
    case 2: GradChannels<12, 2>(xs, dy + o0, dw + o0, g, images, last); break;
    default: GradChannels<12, 1>(xs, dy + o0, dw + o0, g, images, last); break;
  }
}

void KernelGrad(const float* x, const float* dy, float* dw, const Geometry& g,
                ffi::ThreadPool* pool, int64_t workers) {
  const int64_t blocks = (g.o + kBlock - 1) / kBlock;
  const int64_t pixels = g.oh * g.ow;
  const int64_t per_chunk = std::max<int64_t>(1, kChunkPixels / std::max<int64_t>(1, pixels));
  const int64_t chunks = (g.n + per_chunk - 1) / per_chunk;
  const int64_t ranges =
      std::min(chunks, std::max<int64_t>(1, (2 * workers + blocks - 1) / blocks));
  const int64_t size = g.kh * g.kw * g.c * g.o;
  std::vector<float> copies((ranges - 1) * size, 0.f);  // dw itself is the first copy
  std::fill(dw, dw + size, 0.f);
  const int64_t image = g.hp * g.wp * g.c, out_image = g.oh * g.ow * g.o;
  ParallelFor(pool, ranges * blocks, workers, [&](int64_t item) {
    const int64_t r = item / blocks, block = item % blocks;
    float* part = r == 0 ? dw : copies.data() + (r - 1) * size;
    thread_local std::vector<float> scratch;
    thread_local std::array<int64_t, 8> scratch_for{};
    for (int64_t chunk = r * chunks / ranges; chunk < (r + 1) * chunks / ranges; ++chunk) {
      const int64_t n0 = chunk * per_chunk, images = std::min(per_chunk, g.n - n0);
      const float* xs = x + n0 * image;
      if (g.padded) {
        const std::array<int64_t, 8> key{g.h, g.w, g.c, g.hp, g.wp, g.top, g.left, per_chunk};
        if (scratch_for != key) {
          scratch.assign(per_chunk * image, 0.f);
          scratch_for = key;
        }
        for (int64_t k = 0; k < images; ++k) Pad(x, scratch.data() + k * image, g, n0 + k);
        xs = scratch.data();
      }
      GradBlock(xs, dy + n0 * out_image, part, g, images, block);
    }
  });
  if (ranges > 1) {  // dw += copies, in order, in slices
    const int64_t slice = 1 << 14, slices = (size + slice - 1) / slice;
    ParallelFor(pool, slices, workers, [&](int64_t s) {
      const int64_t lo = s * slice, hi = std::min(size, lo + slice);
      for (int64_t r = 1; r < ranges; ++r) {
        const float* src = copies.data() + (r - 1) * size;
        for (int64_t e = lo; e < hi; ++e) dw[e] += src[e];
      }
    });
  }
}

// The geometry of a convolution of x (dimensions xd) by a kernel (kd: (kh, kw, c, o), or
// (kh, kw, o, c) with `swap`) into an output (yd), checked: ranks, channels, strides and
// padding, the output's shape, the CPU. Shared by both handlers.
template <typename Dims>
ffi::Error Describe(const char* name, Geometry& g, const Dims& xd, const Dims& kd, bool swap,
                    const Dims& yd, int64_t sh, int64_t sw, int64_t top, int64_t bottom,
                    int64_t left, int64_t right) {
  const std::string prefix = std::string(name) + ": ";
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument(prefix + "rank-4 NHWC arrays and HWIO kernels only");
  g.n = xd[0], g.h = xd[1], g.w = xd[2], g.c = xd[3];
  g.kh = kd[0], g.kw = kd[1], g.o = swap ? kd[2] : kd[3];
  const int64_t kernel_c = swap ? kd[3] : kd[2];
  g.sh = sh, g.sw = sw, g.top = top, g.left = left;
  g.hp = g.h + top + bottom, g.wp = g.w + left + right;
  if (kernel_c != g.c || sh < 1 || sw < 1 || top < 0 || bottom < 0 || left < 0 || right < 0 ||
      g.hp < g.kh || g.wp < g.kw)
    return ffi::Error::InvalidArgument(prefix + "inconsistent shapes");
  g.oh = (g.hp - g.kh) / sh + 1, g.ow = (g.wp - g.kw) / sw + 1;
  g.padded = top || bottom || left || right;
  if (yd[0] != g.n || yd[1] != g.oh || yd[2] != g.ow || yd[3] != g.o)
    return ffi::Error::InvalidArgument(prefix + "inconsistent shapes");
  if (!Supported()) return ffi::Error::InvalidArgument(prefix + "this CPU has no AVX-512");
  return ffi::Error::Success();
}

ffi::Error Conv2dKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> dy, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                            int64_t sh, int64_t sw, int64_t top, int64_t bottom, int64_t left,
                            int64_t right) {
  Geometry g{};
  ffi::Error error = Describe("ifjax_conv2d_kernel_grad", g, x.dimensions(), dw->dimensions(),
                              false, dy.dimensions(), sh, sw, top, bottom, left, right);
  if (error.failure()) return error;
  const int64_t size = g.kh * g.kw * g.c * g.o;
  if (g.n == 0 || size == 0 || g.oh * g.ow == 0) {
    std::fill(dw->typed_data(), dw->typed_data() + size, 0.f);
    return ffi::Error::Success();
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  KernelGrad(x.typed_data(), dy.typed_data(), dw->typed_data(), g, &pool, workers);
  return ffi::Error::Success();
}

ffi::Error Conv2d(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t sh, int64_t sw, int64_t top,
                  int64_t bottom, int64_t left, int64_t right, int64_t flip) {
  Geometry g{};
  ffi::Error error = Describe("ifjax_conv2d", g, x.dimensions(), w.dimensions(), flip != 0,
                              y->dimensions(), sh, sw, top, bottom, left, right);
  if (error.failure()) return error;
  if (g.n == 0 || g.o == 0) return ffi::Error::Success();
  if (g.c == 0 || g.kh == 0 || g.kw == 0) {
    std::fill(y->typed_data(), y->typed_data() + g.n * g.oh * g.ow * g.o, 0.f);
    return ffi::Error::Success();
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  Conv(x.typed_data(), w.typed_data(), y->typed_data(), g, &pool, workers, flip != 0);
  return ffi::Error::Success();
}

bool Supported() { return __builtin_cpu_supports("avx512f"); }

#else  // not x86-64: the library still builds (for the transpose kernel)

ffi::Error Conv2d(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                  ffi::Result<ffi::Buffer<ffi::F32>>, int64_t, int64_t, int64_t, int64_t,
                  int64_t, int64_t, int64_t) {
  return ffi::Error::InvalidArgument("ifjax_conv2d: built for x86-64 with AVX-512 only");
}

ffi::Error Conv2dKernelGrad(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                            ffi::Result<ffi::Buffer<ffi::F32>>, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t) {
  return ffi::Error::InvalidArgument(
      "ifjax_conv2d_kernel_grad: built for x86-64 with AVX-512 only");
}

bool Supported() { return false; }

#endif  // IFJAX_X86

}  // namespace

extern "C" int IfjaxConvSupported() { return Supported() ? 1 : 0; }

// Both handlers: a thread pool, two float32 arrays in, one out, strides and padding.
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("top")
      .Attr<int64_t>("bottom")
      .Attr<int64_t>("left")
      .Attr<int64_t>("right");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(IfjaxConv2d, Conv2d, ConvBinding().Attr<int64_t>("flip"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(IfjaxConv2dKernelGrad, Conv2dKernelGrad, ConvBinding());
