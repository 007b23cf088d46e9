// Build configuration of the compiled extension, from macros set by setup.py.
#include "build_info.h"

#ifdef ECHOFAST_WITH_CUDA
#include <sstream>

#include "echofast.h"
#endif

namespace echofast {

namespace {

#ifdef ECHOFAST_WITH_CUDA
std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, sep)) {
    if (!part.empty()) {
      parts.push_back(part);
    }
  }
  return parts;
}
#endif

std::string cxx_standard() {
#if __cplusplus > 202002L
  return "c++23";
#elif __cplusplus > 201703L
  return "c++20";
#elif __cplusplus > 201402L
  return "c++17";
#else
  return "c++14";
#endif
}

std::string compiler() {
#if defined(__clang__)
  return "Clang " __clang_version__;
#elif defined(__GNUC__)
  return "GCC " __VERSION__;
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.cxx_standard = cxx_standard();
  info.compiler = compiler();
#ifdef ECHOFAST_WITH_CUDA
  info.cuda = true;
  info.cuda_arches = split(ECHOFAST_CUDA_ARCHES, ';');
  info.nvcc_version = ECHOFAST_NVCC_VERSION;
  const int version = echofast_cuda_compiled_runtime_version();
  info.cudart_version = std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
#else
  info.cuda = false;
#endif
  return info;
}

}  // namespace echofast
