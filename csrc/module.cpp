// pybind11 bindings of echofast._C; implementations live in cpu/ and cuda/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>

#include "cpu/build_info.h"
#include "cpu/video.h"
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

void cuda_planes_to_frames(const echofast_planes& src, const echofast_frames& dst, int resize,
                           int device, std::uintptr_t stream) {
  int status;
  {
    py::gil_scoped_release release;
    status = echofast_cuda_planes_to_frames(&src, &dst, resize, device,
                                            reinterpret_cast<void*>(stream));
  }
  check(status, "planes_to_frames kernel launch");
}

void cuda_frames_to_planes(const echofast_frames& src, const echofast_planes& dst, int device,
                           std::uintptr_t stream) {
  int status;
  {
    py::gil_scoped_release release;
    status = echofast_cuda_frames_to_planes(&src, &dst, device, reinterpret_cast<void*>(stream));
  }
  check(status, "frames_to_planes kernel launch");
}

#else

[[noreturn]] void no_cuda() {
  throw CudaError(
      "echofast._C was built without CUDA support; reinstall with nvcc on PATH or CUDA_HOME set "
      "(ECHOFAST_FORCE_CUDA=1 makes a missing CUDA toolkit a build error)");
}

int device_count() { no_cuda(); }

py::dict device_properties(int) { no_cuda(); }

void cuda_planes_to_frames(const echofast_planes&, const echofast_frames&, int, int,
                           std::uintptr_t) {
  no_cuda();
}

void cuda_frames_to_planes(const echofast_frames&, const echofast_planes&, int, std::uintptr_t) {
  no_cuda();
}

#endif

// ---- video pixel path: descriptors from Python dicts of ints ----

void check_keys(const py::dict& d, const std::set<std::string>& keys, const char* what) {
  for (const auto& item : d) {
    const std::string key = py::str(item.first);
    if (keys.count(key) == 0) {
      throw py::value_error(std::string(what) + ": unknown key '" + key + "'");
    }
  }
  for (const auto& key : keys) {
    if (!d.contains(key)) {
      throw py::value_error(std::string(what) + ": missing key '" + key + "'");
    }
  }
}

template <typename T, size_t N>
void get_array(const py::dict& d, const char* key, T (&out)[N], const char* what) {
  const py::tuple values = py::tuple(d[key]);
  if (values.size() != N) {
    throw py::value_error(std::string(what) + ": '" + key + "' needs " + std::to_string(N) +
                          " values, got " + std::to_string(values.size()));
  }
  for (size_t i = 0; i < N; ++i) {
    out[i] = values[i].cast<T>();
  }
}

echofast_planes planes_from(const py::dict& d, const char* what) {
  check_keys(d,
             {"data", "frame_stride", "row_stride", "table", "frames", "height", "width",
              "layout", "channels", "full_range", "chroma_shift"},
             what);
  echofast_planes planes{};
  std::uintptr_t data[3];
  get_array(d, "data", data, what);
  for (int p = 0; p < 3; ++p) {
    planes.data[p] = reinterpret_cast<unsigned char*>(data[p]);
  }
  get_array(d, "frame_stride", planes.frame_stride, what);
  get_array(d, "row_stride", planes.row_stride, what);
  planes.table = reinterpret_cast<const long long*>(d["table"].cast<std::uintptr_t>());
  planes.frames = d["frames"].cast<int>();
  planes.height = d["height"].cast<int>();
  planes.width = d["width"].cast<int>();
  planes.layout = d["layout"].cast<int>();
  planes.channels = d["channels"].cast<int>();
  planes.full_range = d["full_range"].cast<bool>() ? 1 : 0;
  int shift[2];
  get_array(d, "chroma_shift", shift, what);
  planes.chroma_shift_x = shift[0];
  planes.chroma_shift_y = shift[1];
  echofast::cpu::check_planes(planes, what);
  return planes;
}

echofast_frames frames_from(const py::dict& d, const char* what) {
  check_keys(d, {"data", "dtype", "frames", "height", "width", "channels", "stride"}, what);
  echofast_frames frames{};
  frames.data = reinterpret_cast<void*>(d["data"].cast<std::uintptr_t>());
  frames.dtype = d["dtype"].cast<int>();
  frames.frames = d["frames"].cast<int>();
  frames.height = d["height"].cast<int>();
  frames.width = d["width"].cast<int>();
  frames.channels = d["channels"].cast<int>();
  get_array(d, "stride", frames.stride, what);
  echofast::cpu::check_frames(frames, what);
  return frames;
}

void check_device(int device, const echofast_planes& planes) {
  if (device < -1) {
    throw py::value_error("device must be -1 (CPU) or a CUDA device index, got " +
                          std::to_string(device));
  }
  if (device >= 0 && planes.table != nullptr) {
    throw py::value_error("a per-frame plane table is CPU-only; got one for CUDA device " +
                          std::to_string(device));
  }
}

void planes_to_frames(const py::dict& src_dict, const py::dict& dst_dict, int resize, int threads,
                      int device, std::uintptr_t stream) {
  const echofast_planes src = planes_from(src_dict, "planes_to_frames source");
  const echofast_frames dst = frames_from(dst_dict, "planes_to_frames destination");
  check_device(device, src);
  echofast::cpu::check_planes_to_frames(src, dst, resize);
  if (device >= 0) {
    cuda_planes_to_frames(src, dst, resize, device, stream);
    return;
  }
  py::gil_scoped_release release;
  echofast::cpu::planes_to_frames(src, dst, resize, threads);
}

void frames_to_planes(const py::dict& src_dict, const py::dict& dst_dict, int threads,
                      int device, std::uintptr_t stream) {
  const echofast_frames src = frames_from(src_dict, "frames_to_planes source");
  const echofast_planes dst = planes_from(dst_dict, "frames_to_planes destination");
  check_device(device, dst);
  echofast::cpu::check_frames_to_planes(src, dst);
  if (device >= 0) {
    cuda_frames_to_planes(src, dst, device, stream);
    return;
  }
  py::gil_scoped_release release;
  echofast::cpu::frames_to_planes(src, dst, threads);
}

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

  m.def("planes_to_frames", &planes_to_frames, py::arg("src"), py::arg("dst"),
        py::arg("resize"), py::arg("threads"), py::arg("device"), py::arg("stream"),
        "8-bit YUV or packed planes -> gray / RGB frames (uint8, or x / 128 - 1 as float32, "
        "float16, bfloat16), resized by area (0) or bilinear (1) when sizes differ. `src` and "
        "`dst` are dicts of ints describing memory (see csrc/include/echofast.h); device -1 runs "
        "on `threads` CPU threads (0: all), device >= 0 launches on CUDA `stream` without "
        "synchronising. Memory bounds are the caller's responsibility (echofast.io.pixels).");
  m.def("frames_to_planes", &frames_to_planes, py::arg("src"), py::arg("dst"),
        py::arg("threads"), py::arg("device"), py::arg("stream"),
        "Gray / RGB frames (uint8, or float in [-1, 1] truncated to uint8 as the reference) -> "
        "full-range BT.601 4:2:0 planes (yuvj420p); arguments as planes_to_frames.");
}
