// ifjax CPU kernel: (B, N, S, C) -> (B, C, S, N), the "batch to minor" transpose that the
// kernel gradient of a convolution needs. XLA:CPU writes this transpose element by element,
// reading one float per cache line (~5x slower than a copy); here every (N, C) tile of one
// spatial position is transposed in cache-sized blocks, so both sides stream.
//
// Built on first use by models/_native.py (g++ -O3 -march=native) against the XLA FFI headers
// shipped with jaxlib; registered as the XLA custom call "ifjax_batch_to_minor".

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 16;

template <typename T>
void TransposeRange(const T* x, T* y, int64_t n_size, int64_t s_size, int64_t c_size,
                    int64_t begin, int64_t end) {
  // One (N, C) tile per (b, s), for the flattened rows r = b * S + s in [begin, end): its
  // N rows of C elements (S * C apart in x) are copied into a contiguous scratch tile, which
  // is written out transposed in kBlock x kBlock blocks (rows of N elements, S * N apart).
  std::vector<T> tile(n_size * c_size);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / s_size, s = r % s_size;
    const T* src = x + (b * n_size * s_size + s) * c_size;  // x[b, n, s, :] = src + n*S*C
    T* dst = y + (b * c_size * s_size + s) * n_size;        // y[b, c, s, :] = dst + c*S*N
    for (int64_t n = 0; n < n_size; ++n) {
      std::memcpy(&tile[n * c_size], src + n * s_size * c_size, c_size * sizeof(T));
    }
    for (int64_t n0 = 0; n0 < n_size; n0 += kBlock) {
      const int64_t n1 = std::min(n0 + kBlock, n_size);
      for (int64_t c0 = 0; c0 < c_size; c0 += kBlock) {
        const int64_t c1 = std::min(c0 + kBlock, c_size);
        for (int64_t c = c0; c < c1; ++c) {
          T* out = dst + c * s_size * n_size;
          for (int64_t n = n0; n < n1; ++n) out[n] = tile[n * c_size + c];
        }
      }
    }
  }
}

template <typename T>
void Transpose(const void* x, void* y, int64_t b_size, int64_t n_size, int64_t s_size,
               int64_t c_size, int64_t threads) {
  const T* in = static_cast<const T*>(x);
  T* out = static_cast<T*>(y);
  const int64_t rows = b_size * s_size;
  threads = std::max<int64_t>(1, std::min(threads, rows));
  if (threads == 1) {
    TransposeRange(in, out, n_size, s_size, c_size, 0, rows);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    pool.emplace_back(TransposeRange<T>, in, out, n_size, s_size, c_size, rows * t / threads,
                      rows * (t + 1) / threads);
  }
  TransposeRange(in, out, n_size, s_size, c_size, 0, rows / threads);
  for (auto& thread : pool) thread.join();
}

ffi::Error BatchToMinor(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t threads) {
  auto dims = x.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("ifjax_batch_to_minor: rank 4 only");
  const int64_t b = dims[0], n = dims[1], s = dims[2], c = dims[3];
  switch (ffi::ByteWidth(x.element_type())) {
    case 1: Transpose<uint8_t>(x.untyped_data(), y->untyped_data(), b, n, s, c, threads); break;
    case 2: Transpose<uint16_t>(x.untyped_data(), y->untyped_data(), b, n, s, c, threads); break;
    case 4: Transpose<uint32_t>(x.untyped_data(), y->untyped_data(), b, n, s, c, threads); break;
    case 8: Transpose<uint64_t>(x.untyped_data(), y->untyped_data(), b, n, s, c, threads); break;
    default: return ffi::Error::InvalidArgument("ifjax_batch_to_minor: unsupported dtype");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IfjaxBatchToMinor, BatchToMinor,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads"));
