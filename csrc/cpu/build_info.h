// Build configuration of the compiled extension, independent of pybind11.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace echofast {

struct BuildInfo {
  bool cuda;
  std::vector<std::string> cuda_arches;
  std::optional<std::string> nvcc_version;
  std::optional<std::string> cudart_version;
  std::string cxx_standard;
  std::string compiler;
};

BuildInfo build_info();

}  // namespace echofast
