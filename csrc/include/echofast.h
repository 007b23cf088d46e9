/* C API between the pybind11 bindings (csrc/module.cpp) and the CUDA
 * implementations (csrc/cuda/). Exchanges only plain C types so that the
 * bindings compile without CUDA headers. Functions returning int return a
 * cudaError_t value (0 on success). */
#ifndef ECHOFAST_H_
#define ECHOFAST_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ECHOFAST_DEVICE_NAME_SIZE 256

typedef struct echofast_device_properties {
  char name[ECHOFAST_DEVICE_NAME_SIZE];
  int major;
  int minor;
  size_t total_memory;
  int multi_processor_count;
  /* Encoded as 1000 * major + 10 * minor, like cudaDriverGetVersion. */
  int driver_version;
  int runtime_version;
} echofast_device_properties;

/* CUDART_VERSION of the toolkit the CUDA sources were compiled against. */
int echofast_cuda_compiled_runtime_version(void);

int echofast_cuda_device_count(int* count);
int echofast_cuda_device_properties(int device, echofast_device_properties* props);

const char* echofast_cuda_error_name(int error);
const char* echofast_cuda_error_string(int error);

/* ---- Video pixel path (CPU: csrc/cpu/video.cpp, CUDA: csrc/cuda/video.cu) ----
 * Formulas shared by both live in echofast_video.h. */

enum {
  ECHOFAST_DTYPE_U8 = 0,
  ECHOFAST_DTYPE_F32 = 1,
  ECHOFAST_DTYPE_F16 = 2,
  ECHOFAST_DTYPE_BF16 = 3
};

enum {
  /* Y, U, V planes of 8-bit samples; chroma subsampled by 2^chroma_shift_{x,y}. */
  ECHOFAST_LAYOUT_YUV = 0,
  /* Plane 0 only: `channels` interleaved 8-bit samples per pixel (gray or RGB),
   * already in full range. */
  ECHOFAST_LAYOUT_PACKED = 1
};

enum { ECHOFAST_RESIZE_AREA = 0, ECHOFAST_RESIZE_BILINEAR = 1 };

/* A batch of `frames` images of height x width luma pixels in 8-bit planes.
 * Plane p of frame t starts at data[p] + t * frame_stride[p] and its rows are
 * row_stride[p] bytes apart, unless `table` is set (CPU only): then it holds
 * `frames` rows of 6 int64 [address of plane 0, 1, 2, row stride of plane 0, 1, 2]
 * and data / frame_stride / row_stride are ignored. Strides are in bytes. */
typedef struct echofast_planes {
  unsigned char* data[3];
  long long frame_stride[3];
  long long row_stride[3];
  const long long* table;
  int frames;
  int height;
  int width;
  int layout;
  int channels;      /* packed: 1 or 3; YUV: 3 */
  int full_range;    /* YUV: 1 for JPEG range (yuvj*), 0 for limited (Y 16..235, C 16..240) */
  int chroma_shift_x; /* YUV: 0 or 1 (4:2:0 is 1, 1) */
  int chroma_shift_y;
} echofast_planes;

/* A dense batch of frames (T, H, W, C) of `dtype`, strides in elements. */
typedef struct echofast_frames {
  void* data;
  int dtype;
  int frames;
  int height;
  int width;
  int channels; /* 1 (gray) or 3 (RGB) */
  long long stride[4];
} echofast_frames;

/* planes (YUV or packed) -> frames: gray or RGB, resized to dst's height x width
 * with `resize` (ECHOFAST_RESIZE_*), written as dst->dtype (uint8 pixel values
 * or x / 128 - 1). Launched on `stream` (a cudaStream_t) of `device`; does not
 * synchronise. src->table must be NULL. */
int echofast_cuda_planes_to_frames(const echofast_planes* src, const echofast_frames* dst,
                                   int resize, int device, void* stream);

/* frames (gray or RGB; uint8, or float in [-1, 1] turned into uint8 with the
 * reference's truncation) -> full-range BT.601 4:2:0 planes (yuvj420p). */
int echofast_cuda_frames_to_planes(const echofast_frames* src, const echofast_planes* dst,
                                   int device, void* stream);

#ifdef __cplusplus
}
#endif

#endif
