// NCCL's entry points, resolved with dlopen on first use instead of linked.
//
// Why not link libnccl.so.2: the nvidia-nccl wheel puts it in site-packages/nvidia/nccl/lib. An installed
// _C finds it through RUNPATH $ORIGIN/../nvidia/nccl/lib, but an editable install keeps _C in the source
// tree, where no relative path reaches site-packages. Loading lazily lets `import iso_kernels._C` succeed
// everywhere and turns a missing NCCL into a RuntimeError at the first NCCL call, with the paths tried.
#pragma once

#include <string>

#include <nccl.h>

namespace iso {

// The signatures come from nccl.h through decltype, so a mismatch with the header cannot compile.
#define ISO_NCCL_FUNCTIONS(X) \
  X(ncclGetVersion)           \
  X(ncclGetUniqueId)          \
  X(ncclCommInitRankConfig)   \
  X(ncclCommFinalize)         \
  X(ncclCommDestroy)          \
  X(ncclCommAbort)            \
  X(ncclCommGetAsyncError)    \
  X(ncclAllReduce)            \
  X(ncclGetErrorString)       \
  X(ncclGetLastError)

struct NcclApi {
#define ISO_NCCL_MEMBER(name) decltype(&::name) name = nullptr;
  ISO_NCCL_FUNCTIONS(ISO_NCCL_MEMBER)
#undef ISO_NCCL_MEMBER
  std::string path;      // the file the loader resolved
  std::string found_by;  // "already loaded", "NCCL_HOME", "loader path" or "nvidia-nccl wheel"
};

// Loads libnccl.so.2 on the first call (then cached). Search order: a copy already in the process (torch's
// or iso_kernels._ext's: dlopen RTLD_NOLOAD), so that a second libnccl.so.2 of another version is never
// mapped beside it; $NCCL_HOME/lib; the soname through the loader (LD_LIBRARY_PATH, our RUNPATH, the cache);
// the nvidia-nccl wheel found through importlib. Throws std::runtime_error listing every path tried.
const NcclApi& nccl();

}  // namespace iso
