// CUDA implementation of the video pixel path behind the C API in echofast.h; the formulas
// are the CPU ones (echofast_video.h), so both give bit-identical results.
//
// Design trade-offs:
// - Decode: one thread per output pixel of a frame (32x8 blocks; grid z walks the frames in a
//   grid-stride loop, so any T works within the 65535 grid limit). Each thread converts the
//   YUV / packed samples it needs on the fly (1 for a copy, 4 for bilinear, the kh x kw window
//   for area) instead of staging a converted frame: the source is 1.5 bytes per pixel and
//   L2-resident, so recomputing the integer BT.601 formula is cheaper than another pass
//   through global memory. Writes of a warp are contiguous along x.
// - Encode: one thread per chroma sample, i.e. per 2x2 luma block: it reads the 4 pixels once,
//   writes 4 luma samples and the block's Cb / Cr.
// - Precision: the shared formulas of echofast_video.h (integer gray and encode, fp32 RGB);
//   fp32 with __fmul_rn / __fadd_rn (no FMA contraction) and IEEE division; outputs rounded to
//   nearest even (__float2int_rn, __float2half_rn, __float2bfloat16_rn).
// - Launches are asynchronous on the caller's stream (the current PyTorch stream): nothing here
//   synchronises; launch errors are returned as cudaError_t values.
//
// Kernel arguments (T frames, source H x W luma pixels, destination H' x W'):
//   src: echofast_planes, plane p of frame t at data[p] + t * frame_stride[p] (bytes), rows
//        row_stride[p] bytes apart: YUV planes Y (H, W), U and V (ceil(H / 2^sy), ceil(W / 2^sx)),
//        or one packed plane (H, W * channels). `table` must be NULL.
//   dst: echofast_frames (T, H', W', C) of dtype, strides in elements.
//   mode: 0 same size (H' = H, W' = W), 1 area, 2 bilinear.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "echofast.h"
#include "echofast_video.h"

namespace {

namespace ev = echofast::video;

constexpr int kModeSame = 0;
constexpr int kModeArea = 1;
constexpr int kModeBilinear = 2;
constexpr int kBlockX = 32;
constexpr int kBlockY = 8;
constexpr unsigned kMaxGridZ = 65535;

struct FramePtrs {
  const unsigned char* p[3];
};

__device__ __forceinline__ FramePtrs frame_ptrs(const echofast_planes& src, long long t) {
  FramePtrs f;
  for (int p = 0; p < 3; ++p) {
    f.p[p] = src.data[p] == nullptr ? nullptr : src.data[p] + t * src.frame_stride[p];
  }
  return f;
}

// kChannels 8-bit values of source pixel (x, y).
template <int kChannels>
__device__ __forceinline__ void sample(const echofast_planes& src, const FramePtrs& f, int x,
                                       int y, int* out) {
  if (src.layout == ECHOFAST_LAYOUT_PACKED) {
    const unsigned char* px = f.p[0] + y * src.row_stride[0] + x * src.channels;
    if (kChannels == 1 || src.channels == 1) {
      for (int c = 0; c < kChannels; ++c) {
        out[c] = px[0];
      }
    } else {
      for (int c = 0; c < kChannels; ++c) {
        out[c] = px[c];
      }
    }
    return;
  }
  const int luma = f.p[0][y * src.row_stride[0] + x];
  if (kChannels == 1) {
    out[0] = ev::luma_to_gray(luma, src.full_range != 0);
    return;
  }
  const long long cy = y >> src.chroma_shift_y;
  const int cx = x >> src.chroma_shift_x;
  const int u = f.p[1][cy * src.row_stride[1] + cx];
  const int v = f.p[2][cy * src.row_stride[2] + cx];
  int rgb[3];
  ev::yuv_to_rgb(luma, u, v, ev::rgb_coefficients(src.full_range != 0), rgb);
  for (int c = 0; c < kChannels; ++c) {
    out[c] = rgb[c];
  }
}

template <int kDtype>
struct Store;

template <>
struct Store<ECHOFAST_DTYPE_U8> {
  __device__ static void at(void* data, long long index, float v) {
    static_cast<unsigned char*>(data)[index] =
        static_cast<unsigned char>(ev::clamp_u8(__float2int_rn(v)));
  }
};

template <>
struct Store<ECHOFAST_DTYPE_F32> {
  __device__ static void at(void* data, long long index, float v) {
    static_cast<float*>(data)[index] = ev::normalise(v);
  }
};

template <>
struct Store<ECHOFAST_DTYPE_F16> {
  __device__ static void at(void* data, long long index, float v) {
    static_cast<__half*>(data)[index] = __float2half_rn(ev::normalise(v));
  }
};

template <>
struct Store<ECHOFAST_DTYPE_BF16> {
  __device__ static void at(void* data, long long index, float v) {
    static_cast<__nv_bfloat16*>(data)[index] = __float2bfloat16_rn(ev::normalise(v));
  }
};

template <int kDtype>
struct Load;

template <>
struct Load<ECHOFAST_DTYPE_U8> {
  __device__ static int u8(const void* data, long long index) {
    return static_cast<const unsigned char*>(data)[index];
  }
};

template <>
struct Load<ECHOFAST_DTYPE_F32> {
  __device__ static int u8(const void* data, long long index) {
    return ev::reference_to_u8(static_cast<const float*>(data)[index]);
  }
};

template <>
struct Load<ECHOFAST_DTYPE_F16> {
  __device__ static int u8(const void* data, long long index) {
    return ev::reference_to_u8(__half2float(static_cast<const __half*>(data)[index]));
  }
};

template <>
struct Load<ECHOFAST_DTYPE_BF16> {
  __device__ static int u8(const void* data, long long index) {
    return ev::reference_to_u8(__bfloat162float(static_cast<const __nv_bfloat16*>(data)[index]));
  }
};

template <int kDtype, int kChannels>
__global__ void planes_to_frames_kernel(echofast_planes src, echofast_frames dst, int mode) {
  const int ox = blockIdx.x * blockDim.x + threadIdx.x;
  const int oy = blockIdx.y * blockDim.y + threadIdx.y;
  if (ox >= dst.width || oy >= dst.height) {
    return;
  }
  for (long long t = blockIdx.z; t < dst.frames; t += gridDim.z) {
    const FramePtrs f = frame_ptrs(src, t);
    float value[kChannels];
    if (mode == kModeSame) {
      int px[kChannels];
      sample<kChannels>(src, f, ox, oy, px);
      for (int c = 0; c < kChannels; ++c) {
        value[c] = static_cast<float>(px[c]);
      }
    } else if (mode == kModeArea) {
      int y0, y1, x0, x1;
      ev::area_window(oy, src.height, dst.height, &y0, &y1);
      ev::area_window(ox, src.width, dst.width, &x0, &x1);
      long long total[kChannels] = {};
      for (int y = y0; y < y1; ++y) {
        for (int x = x0; x < x1; ++x) {
          int px[kChannels];
          sample<kChannels>(src, f, x, y, px);
          for (int c = 0; c < kChannels; ++c) {
            total[c] += px[c];
          }
        }
      }
      const float kh = static_cast<float>(y1 - y0);
      const float kw = static_cast<float>(x1 - x0);
      for (int c = 0; c < kChannels; ++c) {
        value[c] = __fdiv_rn(__fdiv_rn(static_cast<float>(total[c]), kh), kw);
      }
    } else {
      int y0, y1, x0, x1;
      float wy0, wy1, wx0, wx1;
      ev::bilinear_taps(oy, src.height, dst.height, &y0, &y1, &wy0, &wy1);
      ev::bilinear_taps(ox, src.width, dst.width, &x0, &x1, &wx0, &wx1);
      int a[kChannels], b[kChannels], c0[kChannels], d[kChannels];
      sample<kChannels>(src, f, x0, y0, a);
      sample<kChannels>(src, f, x1, y0, b);
      sample<kChannels>(src, f, x0, y1, c0);
      sample<kChannels>(src, f, x1, y1, d);
      for (int c = 0; c < kChannels; ++c) {
        const float top = ev::lerp2(static_cast<float>(a[c]), static_cast<float>(b[c]), wx0, wx1);
        const float bottom =
            ev::lerp2(static_cast<float>(c0[c]), static_cast<float>(d[c]), wx0, wx1);
        value[c] = ev::lerp2(top, bottom, wy0, wy1);
      }
    }
    const long long base = t * dst.stride[0] + oy * dst.stride[1] + ox * dst.stride[2];
    for (int c = 0; c < kChannels; ++c) {
      Store<kDtype>::at(dst.data, base + c * dst.stride[3], value[c]);
    }
  }
}

template <int kDtype, int kChannels>
__global__ void frames_to_planes_kernel(echofast_frames src, echofast_planes dst) {
  const int cx = blockIdx.x * blockDim.x + threadIdx.x;
  const int cy = blockIdx.y * blockDim.y + threadIdx.y;
  if (2 * cx >= src.width || 2 * cy >= src.height) {
    return;
  }
  const int rows = min(2, src.height - 2 * cy);
  const int cols = min(2, src.width - 2 * cx);
  for (long long t = blockIdx.z; t < src.frames; t += gridDim.z) {
    unsigned char* y_plane = dst.data[0] + t * dst.frame_stride[0];
    int sums[3] = {0, 0, 0};
    for (int r = 0; r < rows; ++r) {
      const int y = 2 * cy + r;
      for (int k = 0; k < cols; ++k) {
        const int x = 2 * cx + k;
        const long long at = t * src.stride[0] + y * src.stride[1] + x * src.stride[2];
        int luma;
        if (kChannels == 1) {
          luma = Load<kDtype>::u8(src.data, at);
        } else {
          int rgb[3];
          for (int c = 0; c < 3; ++c) {
            rgb[c] = Load<kDtype>::u8(src.data, at + c * src.stride[3]);
            sums[c] += rgb[c];
          }
          luma = ev::rgb_to_luma(rgb[0], rgb[1], rgb[2]);
        }
        y_plane[y * dst.row_stride[0] + x] = static_cast<unsigned char>(luma);
      }
    }
    int cb = 128, cr = 128;
    if (kChannels == 3) {
      ev::rgb_sums_to_chroma(sums[0], sums[1], sums[2], (rows == 2) + (cols == 2), &cb, &cr);
    }
    dst.data[1][t * dst.frame_stride[1] + cy * dst.row_stride[1] + cx] =
        static_cast<unsigned char>(cb);
    dst.data[2][t * dst.frame_stride[2] + cy * dst.row_stride[2] + cx] =
        static_cast<unsigned char>(cr);
  }
}

dim3 grid_for(int width, int height, int frames) {
  const unsigned z = frames < static_cast<int>(kMaxGridZ) ? static_cast<unsigned>(frames)
                                                           : kMaxGridZ;
  return dim3((width + kBlockX - 1) / kBlockX, (height + kBlockY - 1) / kBlockY, z);
}

// Run `launch` with `device` current, restoring the previous device; return the launch error.
template <typename Launch>
int on_device(int device, const Launch& launch) {
  int previous = -1;
  cudaError_t status = cudaGetDevice(&previous);
  if (status == cudaSuccess && previous != device) {
    status = cudaSetDevice(device);
  }
  if (status != cudaSuccess) {
    cudaGetLastError();
    return static_cast<int>(status);
  }
  launch();
  status = cudaGetLastError();
  if (previous != device) {
    cudaSetDevice(previous);
  }
  return static_cast<int>(status);
}

template <int kDtype>
void launch_decode(const echofast_planes& src, const echofast_frames& dst, int mode,
                   cudaStream_t stream) {
  const dim3 grid = grid_for(dst.width, dst.height, dst.frames);
  const dim3 block(kBlockX, kBlockY);
  if (dst.channels == 1) {
    planes_to_frames_kernel<kDtype, 1><<<grid, block, 0, stream>>>(src, dst, mode);
  } else {
    planes_to_frames_kernel<kDtype, 3><<<grid, block, 0, stream>>>(src, dst, mode);
  }
}

template <int kDtype>
void launch_encode(const echofast_frames& src, const echofast_planes& dst, cudaStream_t stream) {
  const dim3 grid = grid_for((src.width + 1) / 2, (src.height + 1) / 2, src.frames);
  const dim3 block(kBlockX, kBlockY);
  if (src.channels == 1) {
    frames_to_planes_kernel<kDtype, 1><<<grid, block, 0, stream>>>(src, dst);
  } else {
    frames_to_planes_kernel<kDtype, 3><<<grid, block, 0, stream>>>(src, dst);
  }
}

}  // namespace

extern "C" int echofast_cuda_planes_to_frames(const echofast_planes* src,
                                              const echofast_frames* dst, int resize, int device,
                                              void* stream) {
  if (src->table != nullptr || src->frames != dst->frames) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (dst->frames == 0) {
    return static_cast<int>(cudaSuccess);
  }
  int mode = kModeSame;
  if (src->height != dst->height || src->width != dst->width) {
    mode = resize == ECHOFAST_RESIZE_BILINEAR ? kModeBilinear : kModeArea;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return on_device(device, [&] {
    switch (dst->dtype) {
      case ECHOFAST_DTYPE_U8:
        launch_decode<ECHOFAST_DTYPE_U8>(*src, *dst, mode, s);
        break;
      case ECHOFAST_DTYPE_F32:
        launch_decode<ECHOFAST_DTYPE_F32>(*src, *dst, mode, s);
        break;
      case ECHOFAST_DTYPE_F16:
        launch_decode<ECHOFAST_DTYPE_F16>(*src, *dst, mode, s);
        break;
      default:
        launch_decode<ECHOFAST_DTYPE_BF16>(*src, *dst, mode, s);
        break;
    }
  });
}

extern "C" int echofast_cuda_frames_to_planes(const echofast_frames* src,
                                              const echofast_planes* dst, int device,
                                              void* stream) {
  if (dst->table != nullptr || src->frames != dst->frames) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (src->frames == 0) {
    return static_cast<int>(cudaSuccess);
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return on_device(device, [&] {
    switch (src->dtype) {
      case ECHOFAST_DTYPE_U8:
        launch_encode<ECHOFAST_DTYPE_U8>(*src, *dst, s);
        break;
      case ECHOFAST_DTYPE_F32:
        launch_encode<ECHOFAST_DTYPE_F32>(*src, *dst, s);
        break;
      case ECHOFAST_DTYPE_F16:
        launch_encode<ECHOFAST_DTYPE_F16>(*src, *dst, s);
        break;
      default:
        launch_encode<ECHOFAST_DTYPE_BF16>(*src, *dst, s);
        break;
    }
  });
}
