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

#ifdef __cplusplus
}
#endif

#endif
