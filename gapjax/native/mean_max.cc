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

inline float Bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float Load(const float* p, int64_t j) { return p[j]; }

inline float Load(const uint16_t* p, int64_t j) {  // bfloat16 -> float32, exact
  return Bits(static_cast<uint32_t>(p[j]) << 16);
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
  for (int64_t j = 0; j < width; ++j) {
    float v0 = Load(rows[0], j), v1 = Load(rows[1], j), v2 = Load(rows[2], j);
    float v3 = Load(rows[3], j), v4 = Load(rows[4], j), v5 = Load(rows[5], j);
    float v6 = Load(rows[6], j), v7 = Load(rows[7], j);
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

// bfloat16 rows read as 32-bit words: word k holds channel 2k in its low half and channel
// 2k+1 in its high half, and each becomes a float32 with one shift or one mask (no
// shuffles), which doubles the speed of the loop over widening each value. The even and
// odd channels keep separate accumulators.
inline uint32_t Word(const uint16_t* p, int64_t k) {
  uint32_t word;
  std::memcpy(&word, p + 2 * k, sizeof word);
  return word;
}
inline float Low(uint32_t word) { return Bits(word << 16); }
inline float High(uint32_t word) { return Bits(word & 0xFFFF0000u); }

void FoldGroupPairs(const uint16_t* const* rows, int64_t words, float* __restrict even_sum,
                    float* __restrict odd_sum, float* __restrict even_peak,
                    float* __restrict odd_peak) {
  for (int64_t k = 0; k < words; ++k) {
    uint32_t w0 = Word(rows[0], k), w1 = Word(rows[1], k), w2 = Word(rows[2], k);
    uint32_t w3 = Word(rows[3], k), w4 = Word(rows[4], k), w5 = Word(rows[5], k);
    uint32_t w6 = Word(rows[6], k), w7 = Word(rows[7], k);
    float e0 = Low(w0), e1 = Low(w1), e2 = Low(w2), e3 = Low(w3);
    float e4 = Low(w4), e5 = Low(w5), e6 = Low(w6), e7 = Low(w7);
    float o0 = High(w0), o1 = High(w1), o2 = High(w2), o3 = High(w3);
    float o4 = High(w4), o5 = High(w5), o6 = High(w6), o7 = High(w7);
    even_sum[k] += ((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7));
    odd_sum[k] += ((o0 + o1) + (o2 + o3)) + ((o4 + o5) + (o6 + o7));
    float even = Max(Max(Max(e0, e1), Max(e2, e3)), Max(Max(e4, e5), Max(e6, e7)));
    float odd = Max(Max(Max(o0, o1), Max(o2, o3)), Max(Max(o4, o5), Max(o6, o7)));
    even_peak[k] = Max(even, even_peak[k]);
    odd_peak[k] = Max(odd, odd_peak[k]);
  }
}

void FoldRowPairs(const uint16_t* __restrict row, int64_t words, float* __restrict even_sum,
                  float* __restrict odd_sum, float* __restrict even_peak,
                  float* __restrict odd_peak) {
  for (int64_t k = 0; k < words; ++k) {
    const uint32_t word = Word(row, k);
    even_sum[k] += Low(word);
    odd_sum[k] += High(word);
    even_peak[k] = Max(Low(word), even_peak[k]);
    odd_peak[k] = Max(High(word), odd_peak[k]);
  }
}

// Calls fold_group on each run of kGroup real rows of one set and fold_row on the rows
// left over; returns the number of real positions.
template <typename T, typename FoldGroupFn, typename FoldRowFn>
int64_t FoldRealRows(const T* x, const bool* mask, int64_t n, int64_t stride,
                     FoldGroupFn fold_group, FoldRowFn fold_row) {
  const T* group[kGroup];
  int filled = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (mask != nullptr && !mask[i]) continue;
    ++count;
    group[filled++] = x + i * stride;
    if (filled == kGroup) {
      fold_group(group);
      filled = 0;
    }
  }
  for (int k = 0; k < filled; ++k) fold_row(group[k]);
  return count;
}

// One thread's accumulators. A load whose address matches an in-flight store in its low
// 12 bits (4K aliasing) waits for that store; the folds store to each accumulator once per
// group and load the rows at the same index, so an accumulator at the rows' 4 KiB phase
// runs at half speed (measured: 8 vs 15 G values/s). Placed regions sit 512 + 1024 r bytes
// past the rows' phase, apart from the rows and from each other.
class Scratch {
 public:
  static constexpr int64_t kPage = 4096;
  explicit Scratch(int64_t width)
      : region_(width + kPage / static_cast<int64_t>(sizeof(float))), arena_(6 * region_) {}

  // Region r (0-3) of `width` floats, placed against `row`.
  float* Placed(int r, const void* row) {
    const auto start = reinterpret_cast<uintptr_t>(arena_.data() + r * region_);
    const uintptr_t phase = (reinterpret_cast<uintptr_t>(row) + 512 + 1024 * r) & (kPage - 4);
    return reinterpret_cast<float*>(start + ((phase - start) & (kPage - 1)));
  }
  // Region r (4-5), for values written once.
  float* Plain(int r) { return arena_.data() + r * region_; }

 private:
  int64_t region_;
  std::vector<float> arena_;
};

struct BlockSums {
  int64_t count;  // real positions
  float* sum;     // [width]
  float* peak;    // [width]
};

constexpr float kLowest = -std::numeric_limits<float>::infinity();

// One accumulator per channel (float32, or bfloat16 blocks of odd width).
template <typename T>
BlockSums FoldPlain(const T* x, const bool* mask, int64_t n, int64_t stride, int64_t width,
                    Scratch& scratch) {
  float* sum = scratch.Placed(0, x);
  float* peak = scratch.Placed(1, x);
  std::fill(sum, sum + width, 0.0f);
  std::fill(peak, peak + width, kLowest);
  const int64_t count = FoldRealRows(
      x, mask, n, stride, [&](const T* const* rows) { FoldGroup(rows, width, sum, peak); },
      [&](const T* row) { FoldRow(row, width, sum, peak); });
  return {count, sum, peak};
}

// bfloat16 blocks of even width as word pairs; the even and odd channels' accumulators are
// interleaved back into channel order at the end.
BlockSums FoldPairs(const uint16_t* x, const bool* mask, int64_t n, int64_t stride,
                    int64_t width, Scratch& scratch) {
  const int64_t words = width / 2;
  float* even_sum = scratch.Placed(0, x);
  float* odd_sum = scratch.Placed(1, x);
  float* even_peak = scratch.Placed(2, x);
  float* odd_peak = scratch.Placed(3, x);
  std::fill(even_sum, even_sum + words, 0.0f);
  std::fill(odd_sum, odd_sum + words, 0.0f);
  std::fill(even_peak, even_peak + words, kLowest);
  std::fill(odd_peak, odd_peak + words, kLowest);
  const int64_t count = FoldRealRows(
      x, mask, n, stride,
      [&](const uint16_t* const* rows) {
        FoldGroupPairs(rows, words, even_sum, odd_sum, even_peak, odd_peak);
      },
      [&](const uint16_t* row) {
        FoldRowPairs(row, words, even_sum, odd_sum, even_peak, odd_peak);
      });
  float* sum = scratch.Plain(4);
  float* peak = scratch.Plain(5);
  for (int64_t k = 0; k < words; ++k) {
    sum[2 * k] = even_sum[k];
    sum[2 * k + 1] = odd_sum[k];
    peak[2 * k] = even_peak[k];
    peak[2 * k + 1] = odd_peak[k];
  }
  return {count, sum, peak};
}

BlockSums Fold(const float* x, const bool* mask, int64_t n, int64_t stride, int64_t width,
               Scratch& scratch) {
  return FoldPlain(x, mask, n, stride, width, scratch);
}

BlockSums Fold(const uint16_t* x, const bool* mask, int64_t n, int64_t stride, int64_t width,
               Scratch& scratch) {
  return width % 2 == 0 ? FoldPairs(x, mask, n, stride, width, scratch)
                        : FoldPlain(x, mask, n, stride, width, scratch);
}

// One set's channel block: `x` points at its first channel of position 0, rows are
// `stride` elements apart; sums and maxima of `width` channels over the real rows.
template <typename T>
BlockSums SumMaxBlock(const T* x, const bool* mask, int64_t n, int64_t stride, int64_t width,
                      Scratch& scratch) {
  const BlockSums sums = Fold(x, mask, n, stride, width, scratch);
  // The comparisons skip NaN; a NaN sum flags the channels to rescan, so that the max
  // propagates NaN exactly when a real position holds one.
  for (int64_t j = 0; j < width; ++j) {
    if (!std::isnan(sums.sum[j])) continue;
    for (int64_t i = 0; i < n; ++i) {
      if ((mask == nullptr || mask[i]) && std::isnan(Load(x + i * stride, j))) {
        sums.peak[j] = std::numeric_limits<float>::quiet_NaN();
        break;
      }
    }
  }
  return sums;
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
// caller and the intra-op thread pool. Every pool thread gets a task: a pool thread left
// idle spins looking for work and takes a core from the ones that work (measured: half of
// the runs 1.5-2x slower on two cores when one pool thread was left out). The caller works
// too and waits only for items already taken, so it finishes even when no pool thread is
// free.
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
    Scratch scratch(block);
    int64_t finished = 0;
    for (int64_t k; (k = progress->next.fetch_add(1)) < items; ++finished) {
      const int64_t b = k / blocks, c0 = (k % blocks) * block;
      const int64_t width = std::min(c, c0 + block) - c0;
      if (width <= 0) continue;
      const bool* set_mask = mask == nullptr ? nullptr : mask + b * n;
      const BlockSums sums = SumMaxBlock(x + b * n * c + c0, set_mask, n, c, width, scratch);
      Out* out = stats + b * 2 * c + c0;
      StoreStats(sums.sum, sums.peak, sums.count, width, out, out + c);
    }
    progress->done.fetch_add(finished);
  };
  for (int64_t t = 0; t < std::min(threads, items); ++t) pool.Schedule([work]() { work(); });
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
