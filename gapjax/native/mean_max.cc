// One-pass mean and max over the positions of a batch of sets, for XLA's CPU backend.
//
//   x      [..., N, C]     float32 or bfloat16 (every leading axis is a batch axis)
//   mask   [..., N]        bool, true = real position (only for the masked handler)
//   stats  [..., 2, C]     float32 or bfloat16: stats[..., 0, :] the mean and
//                          stats[..., 1, :] the max over real positions; both 0 for a
//                          set without real positions; the max is NaN when a real
//                          position holds NaN, as XLA's max gives.
//
// XLA:CPU reads x once per reduction, so avgmax/catavgmax (a sum and a max of one
// tensor) cost two passes over memory. Here each thread reads a row block once and
// keeps both accumulators in cache. Rows are taken eight at a time, so the running sum
// and max are updated once per eight positions. Accumulation is float32 in a fixed order
// per (set, channel), whatever the number of threads, so results are deterministic. The
// [2, C] layout per set is catavgmax's [mean, max] row as it is, with no copy.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kGroup = 8;                   // positions folded per accumulator update
constexpr int64_t kMinBlockChannels = 64;   // narrowest channel block a thread takes

inline float Load(const float* p, int64_t j) { return p[j]; }

inline float Load(const uint16_t* p, int64_t j) {  // bfloat16 -> float32, exact
  uint32_t bits = static_cast<uint32_t>(p[j]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Stores float32 values as float32, or as bfloat16 rounded to nearest even (what XLA's
// convert does); a NaN stays a quiet NaN. Integer arithmetic only, so it vectorises.
inline void StoreRow(const float* __restrict src, int64_t width, float* __restrict dst) {
  std::memcpy(dst, src, width * sizeof(float));
}

inline void StoreRow(const float* __restrict src, int64_t width, uint16_t* __restrict dst) {
  for (int64_t j = 0; j < width; ++j) {
    uint32_t bits;
    std::memcpy(&bits, src + j, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x0040u;
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    dst[j] = static_cast<uint16_t>(is_nan ? quiet_nan : rounded);
  }
}

inline float Max(float a, float b) { return a > b ? a : b; }

// Folds kGroup rows (each `width` channels) into the running sum and max.
template <typename T>
void FoldGroup(const T* const* rows, int64_t width, float* __restrict sum,
               float* __restrict peak) {
  const T* __restrict r0 = rows[0];
  const T* __restrict r1 = rows[1];
  const T* __restrict r2 = rows[2];
  const T* __restrict r3 = rows[3];
  const T* __restrict r4 = rows[4];
  const T* __restrict r5 = rows[5];
  const T* __restrict r6 = rows[6];
  const T* __restrict r7 = rows[7];
  for (int64_t j = 0; j < width; ++j) {
    float v0 = Load(r0, j), v1 = Load(r1, j), v2 = Load(r2, j), v3 = Load(r3, j);
    float v4 = Load(r4, j), v5 = Load(r5, j), v6 = Load(r6, j), v7 = Load(r7, j);
    sum[j] += ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7));
    float m = Max(Max(Max(v0, v1), Max(v2, v3)), Max(Max(v4, v5), Max(v6, v7)));
    peak[j] = Max(m, peak[j]);
  }
}

template <typename T>
void FoldRow(const T* __restrict row, int64_t width, float* __restrict sum,
             float* __restrict peak) {
  for (int64_t j = 0; j < width; ++j) {
    float v = Load(row, j);
    sum[j] += v;
    peak[j] = Max(v, peak[j]);
  }
}

// One set's channel block: `x` points at its first channel of position 0, rows are
// `stride` elements apart; fills `width` sums and maxima and returns the number of real
// positions.
template <typename T>
int64_t SumMaxBlock(const T* x, const bool* mask, int64_t n, int64_t stride, int64_t width,
                    float* sum, float* peak) {
  std::fill(sum, sum + width, 0.0f);
  std::fill(peak, peak + width, -std::numeric_limits<float>::infinity());
  const T* group[kGroup];
  int filled = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (mask != nullptr && !mask[i]) continue;
    ++count;
    group[filled++] = x + i * stride;
    if (filled == kGroup) {
      FoldGroup(group, width, sum, peak);
      filled = 0;
    }
  }
  for (int k = 0; k < filled; ++k) FoldRow(group[k], width, sum, peak);
  // The comparisons above skip NaN; a NaN sum flags the channels to rescan, so that the
  // max propagates NaN exactly when a real position holds one.
  for (int64_t j = 0; j < width; ++j) {
    if (!std::isnan(sum[j])) continue;
    for (int64_t i = 0; i < n; ++i) {
      if ((mask == nullptr || mask[i]) && std::isnan(Load(x + i * stride, j))) {
        peak[j] = std::numeric_limits<float>::quiet_NaN();
        break;
      }
    }
  }
  return count;
}

// Turns one set's block of sums and maxima into means and maxima (zeros for a set
// without real positions), in place, and stores them.
template <typename Out>
void StoreStats(float* __restrict sum, float* __restrict peak, int64_t count, int64_t width,
                Out* mean_out, Out* peak_out) {
  if (count == 0) {
    std::fill(sum, sum + width, 0.0f);
    std::fill(peak, peak + width, 0.0f);
  }
  // sum / count, not sum * (1 / count): the same rounding as the XLA path's division.
  const float divisor = static_cast<float>(std::max<int64_t>(count, 1));
  for (int64_t j = 0; j < width; ++j) sum[j] /= divisor;
  StoreRow(sum, width, mean_out);
  StoreRow(peak, width, peak_out);
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Splits the batch (and, for small batches, the channels) into work items shared by the
// caller and the intra-op thread pool. The caller works too and waits only for items
// already taken, so it finishes even when no pool thread is free.
template <typename T, typename Out>
void MeanMax(ffi::ThreadPool& pool, const T* x, const bool* mask, int64_t batch, int64_t n,
             int64_t c, Out* stats) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t blocks = 1;
  while (batch * blocks < 4 * threads && c / (2 * blocks) >= kMinBlockChannels) blocks *= 2;
  const int64_t block = (c + blocks - 1) / blocks;
  const int64_t items = batch * blocks;
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    std::vector<float> sum(block), peak(block);
    int64_t finished = 0;
    for (int64_t k; (k = progress->next.fetch_add(1)) < items; ++finished) {
      const int64_t b = k / blocks, c0 = (k % blocks) * block;
      const int64_t width = std::min(c, c0 + block) - c0;
      if (width <= 0) continue;
      const bool* set_mask = mask == nullptr ? nullptr : mask + b * n;
      const int64_t count =
          SumMaxBlock(x + b * n * c + c0, set_mask, n, c, width, sum.data(), peak.data());
      Out* out = stats + b * 2 * c + c0;
      StoreStats(sum.data(), peak.data(), count, width, out, out + c);
    }
    progress->done.fetch_add(finished);
  };
  for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule([work]() { work(); });
  work();
  while (progress->done.load() < items) std::this_thread::yield();
}

template <typename T>
ffi::Error MeanMaxTo(ffi::ThreadPool& pool, const T* x, const bool* mask, int64_t batch,
                     int64_t n, int64_t c, ffi::Result<ffi::AnyBuffer>& stats) {
  switch (stats->element_type()) {
    case ffi::F32:
      MeanMax(pool, x, mask, batch, n, c, reinterpret_cast<float*>(stats->untyped_data()));
      return ffi::Error::Success();
    case ffi::BF16:
      MeanMax(pool, x, mask, batch, n, c, reinterpret_cast<uint16_t*>(stats->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("mean_max: stats must be float32 or bfloat16");
  }
}

ffi::Error Dispatch(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, const bool* mask,
                    ffi::Result<ffi::AnyBuffer>& stats) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("mean_max: x needs rank >= 2");
  const int64_t c = dims[dims.size() - 1], n = dims[dims.size() - 2];
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) batch *= dims[i];
  if (static_cast<int64_t>(stats->element_count()) != batch * 2 * c) {
    return ffi::Error::InvalidArgument("mean_max: stats must have shape [..., 2, C]");
  }
  switch (x.element_type()) {
    case ffi::F32:
      return MeanMaxTo(pool, reinterpret_cast<const float*>(x.untyped_data()), mask, batch, n,
                       c, stats);
    case ffi::BF16:
      return MeanMaxTo(pool, reinterpret_cast<const uint16_t*>(x.untyped_data()), mask, batch,
                       n, c, stats);
    default:
      return ffi::Error::InvalidArgument("mean_max: x must be float32 or bfloat16");
  }
}

ffi::Error MeanMaxImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                       ffi::Result<ffi::AnyBuffer> stats) {
  return Dispatch(pool, x, nullptr, stats);
}

ffi::Error MaskedMeanMaxImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                             ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::AnyBuffer> stats) {
  return Dispatch(pool, x, reinterpret_cast<const bool*>(mask.typed_data()), stats);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GapjaxMeanMax, MeanMaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GapjaxMaskedMeanMax, MaskedMeanMaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::AnyBuffer>());
