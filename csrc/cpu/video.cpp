// CPU implementation of the video pixel path (see echofast_video.h for the formulas).
//
// Design: work is split over frames (resizing) or blocks of rows (no resize; encoding) and run
// by std::threads pulling items from an atomic counter; every buffer is allocated before the
// threads start, so a worker cannot throw. Without a resize, each source row is converted to
// 8-bit values and mapped to the output dtype through a 256-entry table (exact: every output
// is a function of one 8-bit value). With a resize, a whole frame is converted into a
// per-thread 8-bit buffer first, then resampled in fp32. YUV -> RGB rows use SSE2 (the x86-64
// baseline; scalar elsewhere and for row tails), with the scalar formula's exact operations.
#include "video.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "echofast_video.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace echofast {
namespace cpu {

namespace {

using video::clamp_u8;

// ---- fp16 / bf16 encodings (round to nearest even) ----------------------------------------

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint16_t float_to_half(float value) {
  uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  bits &= 0x7fffffffu;
  if (bits >= 0x7f800000u) {  // inf or NaN
    return sign | (bits > 0x7f800000u ? 0x7e00u : 0x7c00u);
  }
  if (bits >= 0x477ff000u) {  // rounds to >= 65520: overflow
    return sign | 0x7c00u;
  }
  if (bits < 0x38800000u) {  // below 2^-14: half subnormal or zero
    // Adding 0.5 puts |value| in a float whose last mantissa bit is 2^-24, the half
    // subnormal step; the FPU rounds to nearest even, the mantissa then holds the result.
    const float shifted = bits_float(bits) + 0.5f;
    return sign | static_cast<uint16_t>(float_bits(shifted) - 0x3f000000u);
  }
  const uint32_t odd = (bits >> 13) & 1u;
  bits += 0xc8000fffu + odd;  // rebias the exponent 127 -> 15 and round to nearest even
  return sign | static_cast<uint16_t>(bits >> 13);
}

uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | 0x40u);
  }
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) {
    return bits_float(sign | 0x7f800000u | (mantissa << 13));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

float bf16_to_float(uint16_t value) { return bits_float(static_cast<uint32_t>(value) << 16); }

// ---- output element types ------------------------------------------------------------------

template <int kDtype>
struct Out;

template <>
struct Out<ECHOFAST_DTYPE_U8> {
  using T = uint8_t;
  static T from_value(float v) { return static_cast<T>(clamp_u8(static_cast<int>(std::lrintf(v)))); }
};

template <>
struct Out<ECHOFAST_DTYPE_F32> {
  using T = float;
  static T from_value(float v) { return video::normalise(v); }
};

template <>
struct Out<ECHOFAST_DTYPE_F16> {
  using T = uint16_t;
  static T from_value(float v) { return float_to_half(video::normalise(v)); }
};

template <>
struct Out<ECHOFAST_DTYPE_BF16> {
  using T = uint16_t;
  static T from_value(float v) { return float_to_bf16(video::normalise(v)); }
};

template <int kDtype>
struct In;

template <>
struct In<ECHOFAST_DTYPE_U8> {
  static int u8(const void* data, int64_t index) {
    return static_cast<const uint8_t*>(data)[index];
  }
};

template <>
struct In<ECHOFAST_DTYPE_F32> {
  static int u8(const void* data, int64_t index) {
    return video::reference_to_u8(static_cast<const float*>(data)[index]);
  }
};

template <>
struct In<ECHOFAST_DTYPE_F16> {
  static int u8(const void* data, int64_t index) {
    return video::reference_to_u8(half_to_float(static_cast<const uint16_t*>(data)[index]));
  }
};

template <>
struct In<ECHOFAST_DTYPE_BF16> {
  static int u8(const void* data, int64_t index) {
    return video::reference_to_u8(bf16_to_float(static_cast<const uint16_t*>(data)[index]));
  }
};

// ---- threading -----------------------------------------------------------------------------

int resolve_threads(int threads, int64_t items, int64_t work) {
  if (threads <= 0) {
    threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  // Starting a thread costs tens of microseconds: give each one at least ~64k pixels.
  const int64_t by_work = std::max<int64_t>(1, work / 65536);
  return static_cast<int>(std::max<int64_t>(1, std::min({int64_t{threads}, items, by_work})));
}

// fn(item, worker) for item in [0, items), spread over `threads` workers (one of them the caller).
template <typename Fn>
void parallel_for(int64_t items, int threads, const Fn& fn) {
  if (threads <= 1) {
    for (int64_t item = 0; item < items; ++item) {
      fn(item, 0);
    }
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int index) {
    for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
      fn(item, index);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int index = 1; index < threads; ++index) {
    pool.emplace_back(worker, index);
  }
  worker(0);
  for (auto& thread : pool) {
    thread.join();
  }
}

// ---- plane access --------------------------------------------------------------------------

struct FramePlanes {
  unsigned char* data[3];
  int64_t row_stride[3];
};

FramePlanes frame_planes(const echofast_planes& planes, int64_t t) {
  FramePlanes frame;
  for (int p = 0; p < 3; ++p) {
    if (planes.table != nullptr) {
      frame.data[p] = reinterpret_cast<unsigned char*>(
          static_cast<uintptr_t>(planes.table[6 * t + p]));
      frame.row_stride[p] = planes.table[6 * t + 3 + p];
    } else {
      frame.data[p] = planes.data[p] == nullptr ? nullptr : planes.data[p] + t * planes.frame_stride[p];
      frame.row_stride[p] = planes.row_stride[p];
    }
  }
  return frame;
}

// Per-call tables: the gray value of each luma sample and the colour coefficients.
struct Tables {
  uint8_t gray[256];
  video::RgbCoefficients rgb;
};

void fill_tables(bool full_range, Tables* tables) {
  for (int v = 0; v < 256; ++v) {
    tables->gray[v] = static_cast<uint8_t>(video::luma_to_gray(v, full_range));
  }
  tables->rgb = video::rgb_coefficients(full_range);
}

#if defined(__SSE2__)
// 8 pixels of YUV -> RGB with SSE2: the operations of video::yuv_to_rgb on 4 floats at a time
// (mulps / addps round like scalar fp32; cvtps2dq rounds to nearest even like lrint; the packs
// saturate to 0..255 like clamp_u8).
inline __m128 widen_float(__m128i bytes8, int half) {
  const __m128i zero = _mm_setzero_si128();
  const __m128i words = _mm_unpacklo_epi8(bytes8, zero);
  const __m128i dwords = half ? _mm_unpackhi_epi16(words, zero) : _mm_unpacklo_epi16(words, zero);
  return _mm_cvtepi32_ps(dwords);
}

inline __m128i pack_u8(__m128 lo, __m128 hi) {
  const __m128i words = _mm_packs_epi32(_mm_cvtps_epi32(lo), _mm_cvtps_epi32(hi));
  return _mm_packus_epi16(words, words);
}

void yuv_row_to_rgb_sse2(const uint8_t* row_y, const uint8_t* row_u, const uint8_t* row_v,
                         int sx, int count, const video::RgbCoefficients& k, uint8_t* out) {
  const __m128 y_scale = _mm_set1_ps(k.y_scale), y_offset = _mm_set1_ps(k.y_offset);
  const __m128 rv = _mm_set1_ps(k.rv), gu = _mm_set1_ps(k.gu), gv = _mm_set1_ps(k.gv);
  const __m128 bu = _mm_set1_ps(k.bu), c128 = _mm_set1_ps(128.0f);
  alignas(16) uint8_t planar[3][16];
  for (int x = 0; x + 8 <= count; x += 8) {
    const __m128i y8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row_y + x));
    __m128i u8, v8;
    if (sx) {
      int32_t u4, v4;
      std::memcpy(&u4, row_u + x / 2, 4);
      std::memcpy(&v4, row_v + x / 2, 4);
      u8 = _mm_cvtsi32_si128(u4);
      v8 = _mm_cvtsi32_si128(v4);
      u8 = _mm_unpacklo_epi8(u8, u8);
      v8 = _mm_unpacklo_epi8(v8, v8);
    } else {
      u8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row_u + x));
      v8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row_v + x));
    }
    __m128 r[2], g[2], b[2];
    for (int h = 0; h < 2; ++h) {
      const __m128 yy = _mm_mul_ps(y_scale, _mm_add_ps(widen_float(y8, h), y_offset));
      const __m128 uu = _mm_sub_ps(widen_float(u8, h), c128);
      const __m128 vv = _mm_sub_ps(widen_float(v8, h), c128);
      r[h] = _mm_add_ps(yy, _mm_mul_ps(rv, vv));
      g[h] = _mm_add_ps(_mm_add_ps(yy, _mm_mul_ps(gu, uu)), _mm_mul_ps(gv, vv));
      b[h] = _mm_add_ps(yy, _mm_mul_ps(bu, uu));
    }
    _mm_store_si128(reinterpret_cast<__m128i*>(planar[0]), pack_u8(r[0], r[1]));
    _mm_store_si128(reinterpret_cast<__m128i*>(planar[1]), pack_u8(g[0], g[1]));
    _mm_store_si128(reinterpret_cast<__m128i*>(planar[2]), pack_u8(b[0], b[1]));
    uint8_t* dst = out + 3 * x;
    for (int i = 0; i < 8; ++i) {
      dst[3 * i] = planar[0][i];
      dst[3 * i + 1] = planar[1][i];
      dst[3 * i + 2] = planar[2][i];
    }
  }
}
#endif

// Row y of a source frame as `channels` 8-bit values per pixel, written to out[0, W * channels).
void convert_row(const echofast_planes& src, const FramePlanes& frame, const Tables& tables,
                 int y, int channels, uint8_t* __restrict out) {
  const int width = src.width;
  const uint8_t* __restrict row0 = frame.data[0] + y * frame.row_stride[0];
  if (src.layout == ECHOFAST_LAYOUT_PACKED) {
    if (src.channels == channels) {
      std::memcpy(out, row0, static_cast<size_t>(width) * channels);
    } else {  // gray -> RGB
      for (int x = 0; x < width; ++x) {
        out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = row0[x];
      }
    }
    return;
  }
  if (channels == 1) {
    if (src.full_range) {
      std::memcpy(out, row0, width);
    } else {
      const uint8_t* __restrict gray = tables.gray;
      for (int x = 0; x < width; ++x) {
        out[x] = gray[row0[x]];
      }
    }
    return;
  }
  const int cy = y >> src.chroma_shift_y;
  const uint8_t* row_u = frame.data[1] + cy * frame.row_stride[1];
  const uint8_t* row_v = frame.data[2] + cy * frame.row_stride[2];
  const int sx = src.chroma_shift_x;
  int x = 0;
#if defined(__SSE2__)
  x = width / 8 * 8;
  yuv_row_to_rgb_sse2(row0, row_u, row_v, sx, x, tables.rgb, out);
#endif
  for (; x < width; ++x) {
    int rgb[3];
    video::yuv_to_rgb(row0[x], row_u[x >> sx], row_v[x >> sx], tables.rgb, rgb);
    out[3 * x] = static_cast<uint8_t>(rgb[0]);
    out[3 * x + 1] = static_cast<uint8_t>(rgb[1]);
    out[3 * x + 2] = static_cast<uint8_t>(rgb[2]);
  }
}

// ---- planes -> frames ----------------------------------------------------------------------

constexpr int kRowsPerItem = 32;

template <int kDtype>
void decode_same_size(const echofast_planes& src, const echofast_frames& dst,
                      const Tables& tables, int threads) {
  using T = typename Out<kDtype>::T;
  T lut[256];
  for (int v = 0; v < 256; ++v) {
    lut[v] = Out<kDtype>::from_value(static_cast<float>(v));
  }
  const int channels = dst.channels;
  const int64_t row_elems = int64_t{dst.width} * channels;
  const int64_t stride_x = dst.stride[2];
  const int64_t stride_c = dst.stride[3];
  const bool packed = stride_x == channels && (channels == 1 || stride_c == 1);
  const int64_t blocks = (dst.height + kRowsPerItem - 1) / kRowsPerItem;
  const int64_t items = int64_t{dst.frames} * blocks;
  threads = resolve_threads(threads, items, int64_t{dst.frames} * dst.height * row_elems);
  std::vector<std::vector<uint8_t>> rows(threads, std::vector<uint8_t>(row_elems));
  T* out = static_cast<T*>(dst.data);
  parallel_for(items, threads, [&](int64_t item, int worker) {
    const int64_t t = item / blocks;
    const int y0 = static_cast<int>(item % blocks) * kRowsPerItem;
    const int y1 = std::min(dst.height, y0 + kRowsPerItem);
    const FramePlanes frame = frame_planes(src, t);
    uint8_t* __restrict row = rows[worker].data();
    for (int y = y0; y < y1; ++y) {
      T* __restrict out_row = out + t * dst.stride[0] + y * dst.stride[1];
      if (packed && kDtype == ECHOFAST_DTYPE_U8) {
        convert_row(src, frame, tables, y, channels, reinterpret_cast<uint8_t*>(out_row));
        continue;
      }
      convert_row(src, frame, tables, y, channels, row);
      if (packed) {
        for (int64_t i = 0; i < row_elems; ++i) {
          out_row[i] = lut[row[i]];
        }
        continue;
      }
      for (int x = 0; x < dst.width; ++x) {
        for (int c = 0; c < channels; ++c) {
          out_row[x * stride_x + c * stride_c] = lut[row[x * channels + c]];
        }
      }
    }
  });
}

struct Taps {
  std::vector<int> i0, i1;
  std::vector<float> w0, w1;
};

Taps bilinear_plan(int in, int out) {
  Taps taps;
  taps.i0.resize(out);
  taps.i1.resize(out);
  taps.w0.resize(out);
  taps.w1.resize(out);
  for (int i = 0; i < out; ++i) {
    video::bilinear_taps(i, in, out, &taps.i0[i], &taps.i1[i], &taps.w0[i], &taps.w1[i]);
  }
  return taps;
}

struct Windows {
  std::vector<int> start, end;
};

Windows area_plan(int in, int out) {
  Windows windows;
  windows.start.resize(out);
  windows.end.resize(out);
  for (int i = 0; i < out; ++i) {
    video::area_window(i, in, out, &windows.start[i], &windows.end[i]);
  }
  return windows;
}

template <int kDtype>
void decode_resized(const echofast_planes& src, const echofast_frames& dst,
                    const Tables& tables, int resize, int threads) {
  using T = typename Out<kDtype>::T;
  const int channels = dst.channels;
  const int64_t src_row = int64_t{src.width} * channels;
  threads = resolve_threads(threads, dst.frames,
                            int64_t{dst.frames} * (src.height * src_row +
                                                   int64_t{dst.height} * dst.width * channels));
  std::vector<std::vector<uint8_t>> frames(threads,
                                           std::vector<uint8_t>(src.height * src_row));
  std::vector<std::vector<int32_t>> sums(threads, std::vector<int32_t>(src_row));
  const Taps tx = bilinear_plan(src.width, dst.width);
  const Taps ty = bilinear_plan(src.height, dst.height);
  const Windows ax = area_plan(src.width, dst.width);
  const Windows ay = area_plan(src.height, dst.height);
  T* out = static_cast<T*>(dst.data);
  parallel_for(dst.frames, threads, [&](int64_t t, int worker) {
    const FramePlanes frame = frame_planes(src, t);
    uint8_t* image = frames[worker].data();
    for (int y = 0; y < src.height; ++y) {
      convert_row(src, frame, tables, y, channels, image + y * src_row);
    }
    for (int oy = 0; oy < dst.height; ++oy) {
      T* out_row = out + t * dst.stride[0] + oy * dst.stride[1];
      if (resize == ECHOFAST_RESIZE_AREA) {
        int32_t* sum = sums[worker].data();
        std::fill(sum, sum + src_row, 0);
        const int y0 = ay.start[oy], y1 = ay.end[oy];
        for (int y = y0; y < y1; ++y) {
          const uint8_t* row = image + y * src_row;
          for (int64_t i = 0; i < src_row; ++i) {
            sum[i] += row[i];
          }
        }
        const float kh = static_cast<float>(y1 - y0);
        for (int ox = 0; ox < dst.width; ++ox) {
          const int x0 = ax.start[ox], x1 = ax.end[ox];
          const float kw = static_cast<float>(x1 - x0);
          for (int c = 0; c < channels; ++c) {
            int64_t total = 0;
            for (int x = x0; x < x1; ++x) {
              total += sum[x * channels + c];
            }
            const float value = static_cast<float>(total) / kh / kw;
            out_row[ox * dst.stride[2] + c * dst.stride[3]] = Out<kDtype>::from_value(value);
          }
        }
      } else {
        const uint8_t* r0 = image + ty.i0[oy] * src_row;
        const uint8_t* r1 = image + ty.i1[oy] * src_row;
        const float wy0 = ty.w0[oy], wy1 = ty.w1[oy];
        for (int ox = 0; ox < dst.width; ++ox) {
          const int x0 = tx.i0[ox] * channels, x1 = tx.i1[ox] * channels;
          const float wx0 = tx.w0[ox], wx1 = tx.w1[ox];
          for (int c = 0; c < channels; ++c) {
            const float top = video::lerp2(r0[x0 + c], r0[x1 + c], wx0, wx1);
            const float bottom = video::lerp2(r1[x0 + c], r1[x1 + c], wx0, wx1);
            const float value = video::lerp2(top, bottom, wy0, wy1);
            out_row[ox * dst.stride[2] + c * dst.stride[3]] = Out<kDtype>::from_value(value);
          }
        }
      }
    }
  });
}

template <int kDtype>
void decode(const echofast_planes& src, const echofast_frames& dst, const Tables& tables,
            int resize, int threads) {
  if (src.height == dst.height && src.width == dst.width) {
    decode_same_size<kDtype>(src, dst, tables, threads);
  } else {
    decode_resized<kDtype>(src, dst, tables, resize, threads);
  }
}

// ---- frames -> planes ----------------------------------------------------------------------

template <int kDtype>
void encode(const echofast_frames& src, const echofast_planes& dst, int threads) {
  const int chroma_height = (src.height + 1) / 2;
  const int chroma_width = (src.width + 1) / 2;
  const int pairs_per_item = kRowsPerItem / 2;
  const int64_t blocks = (chroma_height + pairs_per_item - 1) / pairs_per_item;
  const int64_t items = int64_t{src.frames} * blocks;
  threads = resolve_threads(threads, items,
                            int64_t{src.frames} * src.height * src.width * src.channels);
  parallel_for(items, threads, [&](int64_t item, int) {
    const int64_t t = item / blocks;
    const int cy0 = static_cast<int>(item % blocks) * pairs_per_item;
    const int cy1 = std::min(chroma_height, cy0 + pairs_per_item);
    const FramePlanes frame = frame_planes(dst, t);
    const int64_t base = t * src.stride[0];
    for (int cy = cy0; cy < cy1; ++cy) {
      const int rows = std::min(2, src.height - 2 * cy);
      uint8_t* out_u = frame.data[1] + cy * frame.row_stride[1];
      uint8_t* out_v = frame.data[2] + cy * frame.row_stride[2];
      if (src.channels == 1) {
        for (int r = 0; r < rows; ++r) {
          const int y = 2 * cy + r;
          uint8_t* out_y = frame.data[0] + y * frame.row_stride[0];
          const int64_t row = base + y * src.stride[1];
          for (int x = 0; x < src.width; ++x) {
            out_y[x] = static_cast<uint8_t>(In<kDtype>::u8(src.data, row + x * src.stride[2]));
          }
        }
        std::memset(out_u, 128, chroma_width);
        std::memset(out_v, 128, chroma_width);
        continue;
      }
      for (int cx = 0; cx < chroma_width; ++cx) {
        const int cols = std::min(2, src.width - 2 * cx);
        int sums[3] = {0, 0, 0};
        for (int r = 0; r < rows; ++r) {
          const int y = 2 * cy + r;
          uint8_t* out_y = frame.data[0] + y * frame.row_stride[0];
          for (int k = 0; k < cols; ++k) {
            const int x = 2 * cx + k;
            const int64_t at = base + y * src.stride[1] + x * src.stride[2];
            int rgb[3];
            for (int c = 0; c < 3; ++c) {
              rgb[c] = In<kDtype>::u8(src.data, at + c * src.stride[3]);
              sums[c] += rgb[c];
            }
            out_y[x] = static_cast<uint8_t>(video::rgb_to_luma(rgb[0], rgb[1], rgb[2]));
          }
        }
        const int log2_count = (rows == 2) + (cols == 2);
        int cb, cr;
        video::rgb_sums_to_chroma(sums[0], sums[1], sums[2], log2_count, &cb, &cr);
        out_u[cx] = static_cast<uint8_t>(cb);
        out_v[cx] = static_cast<uint8_t>(cr);
      }
    }
  });
}

std::string field(const char* where, const char* name, long long value) {
  return std::string(where) + ": " + name + " = " + std::to_string(value);
}

}  // namespace

void check_planes(const echofast_planes& planes, const char* where) {
  if (planes.frames < 0 || planes.height < 1 || planes.width < 1) {
    throw std::invalid_argument(std::string(where) + ": planes have frames = " +
                                std::to_string(planes.frames) + ", height = " +
                                std::to_string(planes.height) + ", width = " +
                                std::to_string(planes.width) + "; need frames >= 0, sizes >= 1");
  }
  if (planes.layout == ECHOFAST_LAYOUT_YUV) {
    for (int shift : {planes.chroma_shift_x, planes.chroma_shift_y}) {
      if (shift != 0 && shift != 1) {
        throw std::invalid_argument(field(where, "chroma shift", shift) + "; must be 0 or 1");
      }
    }
  } else if (planes.layout == ECHOFAST_LAYOUT_PACKED) {
    if (planes.channels != 1 && planes.channels != 3) {
      throw std::invalid_argument(field(where, "packed channels", planes.channels) +
                                  "; must be 1 or 3");
    }
  } else {
    throw std::invalid_argument(field(where, "layout", planes.layout) + "; must be 0 or 1");
  }
  const int used = planes.layout == ECHOFAST_LAYOUT_YUV ? 3 : 1;
  for (int p = 0; p < used && planes.table == nullptr && planes.frames > 0; ++p) {
    if (planes.data[p] == nullptr) {
      throw std::invalid_argument(field(where, "null data pointer of plane", p));
    }
    if (planes.row_stride[p] < 0 || planes.frame_stride[p] < 0) {
      throw std::invalid_argument(field(where, "negative stride of plane", p));
    }
  }
}

void check_frames(const echofast_frames& frames, const char* where) {
  if (frames.dtype < ECHOFAST_DTYPE_U8 || frames.dtype > ECHOFAST_DTYPE_BF16) {
    throw std::invalid_argument(field(where, "dtype code", frames.dtype) + "; must be 0..3");
  }
  if (frames.channels != 1 && frames.channels != 3) {
    throw std::invalid_argument(field(where, "channels", frames.channels) + "; must be 1 or 3");
  }
  if (frames.frames < 0 || frames.height < 1 || frames.width < 1) {
    throw std::invalid_argument(std::string(where) + ": frames have frames = " +
                                std::to_string(frames.frames) + ", height = " +
                                std::to_string(frames.height) + ", width = " +
                                std::to_string(frames.width) + "; need frames >= 0, sizes >= 1");
  }
  if (frames.frames > 0 && frames.data == nullptr) {
    throw std::invalid_argument(std::string(where) + ": null frame data pointer");
  }
  for (int d = 0; d < 4; ++d) {
    if (frames.stride[d] < 0) {
      throw std::invalid_argument(field(where, "negative frame stride in dimension", d));
    }
  }
}

void check_planes_to_frames(const echofast_planes& src, const echofast_frames& dst,
                            int resize) {
  check_planes(src, "planes_to_frames source");
  check_frames(dst, "planes_to_frames destination");
  if (src.frames != dst.frames) {
    throw std::invalid_argument("planes_to_frames: source has " + std::to_string(src.frames) +
                                " frames, destination " + std::to_string(dst.frames));
  }
  if (src.layout == ECHOFAST_LAYOUT_PACKED && src.channels != dst.channels &&
      src.channels != 1) {
    throw std::invalid_argument("planes_to_frames: packed source has " +
                                std::to_string(src.channels) + " channels, destination " +
                                std::to_string(dst.channels));
  }
  if (resize != ECHOFAST_RESIZE_AREA && resize != ECHOFAST_RESIZE_BILINEAR) {
    throw std::invalid_argument(field("planes_to_frames", "resize", resize) + "; must be 0 or 1");
  }
}

void check_frames_to_planes(const echofast_frames& src, const echofast_planes& dst) {
  check_frames(src, "frames_to_planes source");
  check_planes(dst, "frames_to_planes destination");
  if (dst.layout != ECHOFAST_LAYOUT_YUV || dst.chroma_shift_x != 1 || dst.chroma_shift_y != 1 ||
      !dst.full_range) {
    throw std::invalid_argument("frames_to_planes: destination must be full-range 4:2:0 YUV");
  }
  if (src.frames != dst.frames || src.height != dst.height || src.width != dst.width) {
    throw std::invalid_argument(
        "frames_to_planes: source is " + std::to_string(src.frames) + "x" +
        std::to_string(src.height) + "x" + std::to_string(src.width) + ", destination " +
        std::to_string(dst.frames) + "x" + std::to_string(dst.height) + "x" +
        std::to_string(dst.width));
  }
}

void planes_to_frames(const echofast_planes& src, const echofast_frames& dst, int resize,
                      int threads) {
  check_planes_to_frames(src, dst, resize);
  if (dst.frames == 0) {
    return;
  }
  Tables tables;
  fill_tables(src.full_range != 0, &tables);
  switch (dst.dtype) {
    case ECHOFAST_DTYPE_U8:
      decode<ECHOFAST_DTYPE_U8>(src, dst, tables, resize, threads);
      break;
    case ECHOFAST_DTYPE_F32:
      decode<ECHOFAST_DTYPE_F32>(src, dst, tables, resize, threads);
      break;
    case ECHOFAST_DTYPE_F16:
      decode<ECHOFAST_DTYPE_F16>(src, dst, tables, resize, threads);
      break;
    default:
      decode<ECHOFAST_DTYPE_BF16>(src, dst, tables, resize, threads);
      break;
  }
}

void frames_to_planes(const echofast_frames& src, const echofast_planes& dst, int threads) {
  check_frames_to_planes(src, dst);
  if (src.frames == 0) {
    return;
  }
  switch (src.dtype) {
    case ECHOFAST_DTYPE_U8:
      encode<ECHOFAST_DTYPE_U8>(src, dst, threads);
      break;
    case ECHOFAST_DTYPE_F32:
      encode<ECHOFAST_DTYPE_F32>(src, dst, threads);
      break;
    case ECHOFAST_DTYPE_F16:
      encode<ECHOFAST_DTYPE_F16>(src, dst, threads);
      break;
    default:
      encode<ECHOFAST_DTYPE_BF16>(src, dst, threads);
      break;
  }
}

}  // namespace cpu
}  // namespace echofast
