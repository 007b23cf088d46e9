// pybind11 bindings of echofast._C; implementations live in cpu/ and cuda/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu/build_info.h"
#include "echofast.h"

namespace py = pybind11;

namespace {

constexpr const char* kPybind11Version = PYBIND11_TOSTRING(PYBIND11_VERSION_MAJOR)
    "." PYBIND11_TOSTRING(PYBIND11_VERSION_MINOR) "." PYBIND11_TOSTRING(PYBIND11_VERSION_PATCH);

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

py::dict build_info() {
  const echofast::BuildInfo info = echofast::build_info();
  py::dict result;
  result["cuda"] = info.cuda;
  result["cuda_arches"] = info.cuda_arches;
  result["nvcc_version"] = info.nvcc_version;
  result["cudart_version"] = info.cudart_version;
  result["cxx_standard"] = info.cxx_standard;
  result["compiler"] = info.compiler;
  result["pybind11_version"] = kPybind11Version;
  return result;
}

#ifdef ECHOFAST_WITH_CUDA

void check(int status, const char* call) {
  if (status != 0) {
    throw CudaError(std::string(call) + " failed: " + echofast_cuda_error_name(status) + " (" +
                    std::to_string(status) + "): " + echofast_cuda_error_string(status));
  }
}

int device_count() {
  int count = 0;
  int status;
  {
    py::gil_scoped_release release;
    status = echofast_cuda_device_count(&count);
  }
  check(status, "cudaGetDeviceCount");
  return count;
}

std::string format_version(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

py::dict device_properties(int index) {
  const int count = device_count();
  if (index < 0 || index >= count) {
    throw CudaError("CUDA device index " + std::to_string(index) + " is out of range: " +
                    std::to_string(count) + " CUDA device(s) available");
  }
  echofast_device_properties props;
  int status;
  {
    py::gil_scoped_release release;
    status = echofast_cuda_device_properties(index, &props);
  }
  check(status, "cudaGetDeviceProperties");
  py::dict result;
  result["index"] = index;
  result["name"] = std::string(props.name);
  result["major"] = props.major;
  result["minor"] = props.minor;
  result["total_memory"] = props.total_memory;
  result["multi_processor_count"] = props.multi_processor_count;
  result["driver_version"] = format_version(props.driver_version);
  result["runtime_version"] = format_version(props.runtime_version);
  return result;
}

#else

[[noreturn]] void no_cuda() {
  throw CudaError(
      "echofast._C was built without CUDA support; reinstall with nvcc on PATH or CUDA_HOME set "
      "(ECHOFAST_FORCE_CUDA=1 makes a missing CUDA toolkit a build error)");
}

int device_count() { no_cuda(); }

py::dict device_properties(int) { no_cuda(); }

#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled extension of echofast (pybind11; CUDA parts optional).";

  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def("build_info", &build_info,
        "Build configuration: cuda, cuda_arches, nvcc_version, cudart_version, cxx_standard, "
        "compiler, pybind11_version.");
  m.def("cuda_device_count", &device_count,
        "Number of visible CUDA devices; raises CudaError when there is no usable driver or "
        "device.");
  m.def("cuda_device_properties", &device_properties, py::arg("index"),
        "Properties of CUDA device `index` as a dict; raises CudaError on failure or when the "
        "index is out of range.");
}
