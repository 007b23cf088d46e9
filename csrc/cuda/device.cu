// CUDA runtime device queries behind the C API in echofast.h.
#include <cuda_runtime_api.h>

#include <cstring>

#include "echofast.h"

namespace {

int clear_last_error(cudaError_t status) {
  if (status != cudaSuccess) {
    cudaGetLastError();
  }
  return static_cast<int>(status);
}

}  // namespace

extern "C" int echofast_cuda_compiled_runtime_version(void) { return CUDART_VERSION; }

extern "C" int echofast_cuda_device_count(int* count) {
  *count = 0;
  return clear_last_error(cudaGetDeviceCount(count));
}

extern "C" int echofast_cuda_device_properties(int device, echofast_device_properties* props) {
  std::memset(props, 0, sizeof(*props));
  cudaDeviceProp prop;
  cudaError_t status = cudaGetDeviceProperties(&prop, device);
  if (status != cudaSuccess) {
    return clear_last_error(status);
  }
  static_assert(sizeof(prop.name) <= ECHOFAST_DEVICE_NAME_SIZE, "device name buffer too small");
  std::memcpy(props->name, prop.name, sizeof(prop.name));
  props->name[ECHOFAST_DEVICE_NAME_SIZE - 1] = '\0';
  props->major = prop.major;
  props->minor = prop.minor;
  props->total_memory = prop.totalGlobalMem;
  props->multi_processor_count = prop.multiProcessorCount;
  status = cudaDriverGetVersion(&props->driver_version);
  if (status != cudaSuccess) {
    return clear_last_error(status);
  }
  return clear_last_error(cudaRuntimeGetVersion(&props->runtime_version));
}

extern "C" const char* echofast_cuda_error_name(int error) {
  return cudaGetErrorName(static_cast<cudaError_t>(error));
}

extern "C" const char* echofast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
