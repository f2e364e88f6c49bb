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
  X(ncclCommInitRank)         \
  X(ncclCommFinalize)         \
  X(ncclCommDestroy)          \
  X(ncclCommAbort)            \
  X(ncclCommGetAsyncError)    \
  X(ncclAllReduce)            \
  X(ncclGroupStart)           \
  X(ncclGroupEnd)             \
  X(ncclGetErrorString)       \
  X(ncclGetLastError)

struct NcclApi {
#define ISO_NCCL_MEMBER(name) decltype(&::name) name = nullptr;
  ISO_NCCL_FUNCTIONS(ISO_NCCL_MEMBER)
#undef ISO_NCCL_MEMBER
  std::string path;  // the file the loader resolved
};

// Loads libnccl.so.2 on the first call (then cached). Search order: $NCCL_HOME/lib; the soname (a copy
// already loaded by torch or iso_kernels._ext, LD_LIBRARY_PATH, our RUNPATH, the loader cache); the
// nvidia-nccl wheel found through importlib. Throws std::runtime_error listing every path tried.
const NcclApi& nccl();

}  // namespace iso
