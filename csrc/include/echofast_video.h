// Pixel formulas of the video path, shared by the CPU (csrc/cpu/video.cpp) and CUDA
// (csrc/cuda/video.cu) implementations so that both give bit-identical results.
//
// Design and precision choices:
// - YUV -> RGB is BT.601 in fp32 with one fixed order of IEEE operations (no FMA: device code
//   uses __fmul_rn / __fadd_rn, host code is compiled without contraction) and round-to-nearest-
//   even, so the scalar, SSE2 and CUDA paths agree bit for bit; fp32 is within ~3e-5 of the
//   exact value, so results equal round(exact BT.601) except that close to a .5 boundary. fp32
//   (rather than fixed point) because SSE2, the x86-64 baseline, has packed float multiplies
//   but no packed 32-bit integer multiply. Chroma is the sample covering the pixel (nearest, as
//   FFmpeg's unscaled yuv -> rgb path).
// - Gray is the luma plane: Y for full range, round((Y - 16) * 255 / 219) clamped for limited
//   range, in 20-bit fixed point (FFmpeg's gray conversion; it has no .5 ties).
// - Resizing works on the converted 8-bit values in fp32: "area" is adaptive average pooling
//   (integer window bounds, sum / kh / kw, i.e. torch's interpolate(mode="area") exactly),
//   "bilinear" is half-pixel-centre bilinear without antialiasing (torch's align_corners=False).
//   Device code uses __fmul_rn / __fadd_rn so that nvcc cannot contract to FMA.
// - Float output is v / 128 - 1 (the reference's normalisation), in fp32 and then rounded to
//   nearest-even for fp16 / bf16; uint8 output after a resize is rint(v).
// - Encoding: float x -> uint8(clamp((x + 1) * 128, 0, 255)) with truncation (the reference;
//   NaN gives 0), then full-range BT.601 (yuvj420p): Y from each pixel, Cb / Cr from the mean of
//   the 2x2 block (fewer pixels at odd edges).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ECHOFAST_HD __host__ __device__ __forceinline__
#else
#define ECHOFAST_HD inline
#endif

namespace echofast {
namespace video {

constexpr int kShift = 20;
constexpr int32_t kHalf = 1 << (kShift - 1);

constexpr int32_t fixed(double value) {
  return static_cast<int32_t>(value * (1 << kShift) + (value < 0 ? -0.5 : 0.5));
}

// BT.601 luma weights.
constexpr double kKr = 0.299;
constexpr double kKb = 0.114;
constexpr double kKg = 1.0 - kKr - kKb;
// Limited range: Y in 16..235 (219 steps), chroma in 16..240 (224 steps).
constexpr double kLimitedLuma = 255.0 / 219.0;
constexpr double kLimitedChroma = 255.0 / 224.0;

constexpr int32_t kYLimited = fixed(kLimitedLuma);

// YCbCr -> RGB in fp32: R = Y' + rv*V', G = Y' - gu*U' - gv*V', B = Y' + bu*U' with U' = U - 128
// and Y' = Y (full range) or (Y - 16) * 255/219 (limited; chroma coefficients * 255/224).
constexpr float kRvFull = static_cast<float>(2.0 * (1.0 - kKr));
constexpr float kGuFull = static_cast<float>(2.0 * kKb * (1.0 - kKb) / kKg);
constexpr float kGvFull = static_cast<float>(2.0 * kKr * (1.0 - kKr) / kKg);
constexpr float kBuFull = static_cast<float>(2.0 * (1.0 - kKb));
constexpr float kYLimitedF = static_cast<float>(kLimitedLuma);
constexpr float kRvLimited = static_cast<float>(2.0 * (1.0 - kKr) * kLimitedChroma);
constexpr float kGuLimited = static_cast<float>(2.0 * kKb * (1.0 - kKb) / kKg * kLimitedChroma);
constexpr float kGvLimited = static_cast<float>(2.0 * kKr * (1.0 - kKr) / kKg * kLimitedChroma);
constexpr float kBuLimited = static_cast<float>(2.0 * (1.0 - kKb) * kLimitedChroma);

// RGB -> YCbCr (full range). Each row sums to 2^20 (Y) or 0 (Cb, Cr) exactly.
constexpr int32_t kYr = fixed(kKr);
constexpr int32_t kYb = fixed(kKb);
constexpr int32_t kYg = (1 << kShift) - kYr - kYb;
constexpr int32_t kCbR = fixed(kKr / (2.0 * (1.0 - kKb)));
constexpr int32_t kCbB = 1 << (kShift - 1);
constexpr int32_t kCbG = kCbB - kCbR;
constexpr int32_t kCrB = fixed(kKb / (2.0 * (1.0 - kKr)));
constexpr int32_t kCrR = 1 << (kShift - 1);
constexpr int32_t kCrG = kCrR - kCrB;

ECHOFAST_HD int clamp_u8(int value) { return value < 0 ? 0 : (value > 255 ? 255 : value); }

// floor(value / 2^shift) for any sign.
ECHOFAST_HD int64_t floor_shift(int64_t value, int shift) {
  return value >= 0 ? value >> shift : -((-value + (int64_t{1} << shift) - 1) >> shift);
}

ECHOFAST_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ECHOFAST_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Gray value of a luma sample.
ECHOFAST_HD int luma_to_gray(int y, bool full_range) {
  return full_range ? y : clamp_u8(static_cast<int>(floor_shift(
                              int64_t{y - 16} * kYLimited + kHalf, kShift)));
}

// Round to nearest (ties to even) as an int: the rounding of SSE2's cvtps2dq and CUDA's
// __float2int_rn (the default floating-point environment is assumed on the CPU).
ECHOFAST_HD int round_even(float value) {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(value);
#else
  return static_cast<int>(std::lrint(value));
#endif
}

// The fp32 operations of YCbCr -> RGB, in the order every implementation (scalar, SSE2, CUDA)
// performs them, so that all round identically.
struct RgbCoefficients {
  float y_scale, y_offset, rv, gu, gv, bu;
};

ECHOFAST_HD RgbCoefficients rgb_coefficients(bool full_range) {
  return full_range ? RgbCoefficients{1.0f, 0.0f, kRvFull, -kGuFull, -kGvFull, kBuFull}
                    : RgbCoefficients{kYLimitedF, -16.0f, kRvLimited, -kGuLimited, -kGvLimited,
                                      kBuLimited};
}

// BT.601 YCbCr -> RGB, rounded to nearest and clamped; rgb receives 3 values.
ECHOFAST_HD void yuv_to_rgb(int y, int u, int v, const RgbCoefficients& k, int* rgb) {
  const float yy = mul_rn(k.y_scale, static_cast<float>(y) + k.y_offset);
  const float uu = static_cast<float>(u - 128);
  const float vv = static_cast<float>(v - 128);
  rgb[0] = clamp_u8(round_even(add_rn(yy, mul_rn(k.rv, vv))));
  rgb[1] = clamp_u8(round_even(add_rn(add_rn(yy, mul_rn(k.gu, uu)), mul_rn(k.gv, vv))));
  rgb[2] = clamp_u8(round_even(add_rn(yy, mul_rn(k.bu, uu))));
}

// Full-range luma of one RGB pixel.
ECHOFAST_HD int rgb_to_luma(int r, int g, int b) {
  return clamp_u8((kYr * r + kYg * g + kYb * b + kHalf) >> kShift);
}

// Full-range Cb and Cr of the mean of 2^log2_count pixels whose channel sums are sr, sg, sb.
ECHOFAST_HD void rgb_sums_to_chroma(int sr, int sg, int sb, int log2_count, int* cb, int* cr) {
  const int shift = kShift + log2_count;
  const int64_t half = int64_t{1} << (shift - 1);
  const int64_t b = int64_t{kCbB} * sb - int64_t{kCbR} * sr - int64_t{kCbG} * sg;
  const int64_t r = int64_t{kCrR} * sr - int64_t{kCrG} * sg - int64_t{kCrB} * sb;
  *cb = clamp_u8(128 + static_cast<int>(floor_shift(b + half, shift)));
  *cr = clamp_u8(128 + static_cast<int>(floor_shift(r + half, shift)));
}

// The reference's float -> uint8: uint8(clamp((x + 1) * 128, 0, 255)), truncating; NaN -> 0.
ECHOFAST_HD int reference_to_u8(float x) {
  const float t = (x + 1.0f) * 128.0f;
  if (!(t > 0.0f)) {
    return 0;
  }
  return t >= 255.0f ? 255 : static_cast<int>(t);
}

// The reference's normalisation of a pixel value v (0..255, possibly fractional after a resize).
ECHOFAST_HD float normalise(float v) { return v * (1.0f / 128.0f) - 1.0f; }

// Source window [start, end) of output index i for adaptive average pooling in -> out.
ECHOFAST_HD void area_window(int i, int in, int out, int* start, int* end) {
  *start = static_cast<int>(int64_t{i} * in / out);
  *end = static_cast<int>((int64_t{i + 1} * in + out - 1) / out);
}

// Bilinear taps of output index i (half-pixel centres, no antialiasing): value =
// w0 * src[i0] + w1 * src[i1].
ECHOFAST_HD void bilinear_taps(int i, int in, int out, int* i0, int* i1, float* w0, float* w1) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  float src = add_rn(mul_rn(scale, static_cast<float>(i) + 0.5f), -0.5f);
  if (src < 0.0f) {
    src = 0.0f;
  }
  int index = static_cast<int>(src);
  if (index > in - 1) {
    index = in - 1;
  }
  float lambda = src - static_cast<float>(index);
  lambda = lambda < 0.0f ? 0.0f : (lambda > 1.0f ? 1.0f : lambda);
  *i0 = index;
  *i1 = index + (index < in - 1 ? 1 : 0);
  *w1 = lambda;
  *w0 = 1.0f - lambda;
}

// w0 * a + w1 * b without FMA contraction.
ECHOFAST_HD float lerp2(float a, float b, float w0, float w1) {
  return add_rn(mul_rn(w0, a), mul_rn(w1, b));
}

}  // namespace video
}  // namespace echofast
