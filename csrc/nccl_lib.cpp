#include "nccl_lib.h"

#include <dlfcn.h>

#include <cstdlib>
#include <stdexcept>
#include <vector>

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace iso {
namespace {

constexpr const char* kSoname = "libnccl.so.2";

// Roots of the nvidia-nccl wheel ("nvidia.nccl" is a namespace package: possibly several folders).
std::vector<std::string> wheel_library_paths() {
  std::vector<std::string> paths;
  py::gil_scoped_acquire gil;
  try {
    py::object spec = py::module_::import("importlib.util").attr("find_spec")("nvidia.nccl");
    if (!spec.is_none() && !spec.attr("submodule_search_locations").is_none()) {
      for (py::handle root : spec.attr("submodule_search_locations")) {
        paths.push_back(py::str(root).cast<std::string>() + "/lib/" + kSoname);
      }
    }
  } catch (const py::error_already_set&) {
    // No "nvidia" package at all: the wheel is simply not a candidate.
  }
  return paths;
}

void* open_first(const std::vector<std::string>& paths, std::string& tried, std::string& opened) {
  for (const auto& path : paths) {
    if (void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      opened = path;
      return handle;
    }
    const char* why = dlerror();
    tried += "\n  " + path + ": " + (why ? why : "not loadable");
  }
  return nullptr;
}

NcclApi load() {
  std::string tried, opened, found_by = "already loaded";
  void* handle = dlopen(kSoname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
  if (handle != nullptr) {
    opened = kSoname;
  } else {
    (void)dlerror();
    tried += std::string("\n  ") + kSoname + " already in the process: no";
    if (const char* home = std::getenv("NCCL_HOME"); home != nullptr && *home != '\0') {
      found_by = "NCCL_HOME";
      handle = open_first({std::string(home) + "/lib/" + kSoname}, tried, opened);
    }
  }
  if (handle == nullptr) {
    found_by = "loader path";
    handle = open_first({kSoname}, tried, opened);
  }
  if (handle == nullptr) {
    found_by = "nvidia-nccl wheel";
    handle = open_first(wheel_library_paths(), tried, opened);
  }
  if (handle == nullptr) {
    throw std::runtime_error(std::string("cannot load NCCL's ") + kSoname + "; tried:" + tried +
                             "\nset NCCL_HOME or pip install nvidia-nccl-cu13");
  }
  NcclApi api;
#define ISO_NCCL_RESOLVE(name)                                                              \
  api.name = reinterpret_cast<decltype(api.name)>(dlsym(handle, #name));                    \
  if (api.name == nullptr) {                                                                \
    throw std::runtime_error(opened + " lacks " #name ": NCCL too old (need >= 2.14)");     \
  }
  ISO_NCCL_FUNCTIONS(ISO_NCCL_RESOLVE)
#undef ISO_NCCL_RESOLVE
  // Report the file actually mapped, also when the soname resolved to an already-loaded copy.
  Dl_info info{};
  const bool found = dladdr(reinterpret_cast<void*>(api.ncclGetVersion), &info) != 0 && info.dli_fname;
  api.path = found ? info.dli_fname : opened;
  api.found_by = found_by;
  return api;
}

}  // namespace

const NcclApi& nccl() {
  // A throwing initialiser leaves the static uninitialised, so a later call retries (e.g. after a preload).
  static const NcclApi api = load();
  return api;
}

}  // namespace iso
