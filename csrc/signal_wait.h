// One-thread stream kernels: wait on a device flag (gating a collective on its producer's progress) and
// sleep for a wall-clock time (emulating a link on one GPU).
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace iso {

// Written by timed-out flag waits into mapped pinned host memory; the host only reads it. The first timeout
// is kept (sticky): its details stay readable while later waits time out too, and nothing is cleared that a
// later wait could be writing. Waits run on one in-order comm stream, so they never write it concurrently.
struct WaitStatus {
  int timed_out;  // 0, then 1 from the first timeout on; published after `observed` and `target`
  int observed;   // the first timed-out wait's flag value when it gave up
  int target;     // and its target
  int timeouts;   // how many waits timed out
};

// `stream` waits until *flag >= target, or until timeout_ns elapsed, which it reports in *status.
void launch_wait_flag(const int* flag, int target, std::uint64_t timeout_ns, WaitStatus* status,
                      cudaStream_t stream);

// `stream` is busy for `nanoseconds` of wall-clock time (the current device's %globaltimer).
void launch_stream_sleep(std::uint64_t nanoseconds, cudaStream_t stream);

// Loads this file's kernels into the current device's context now. Under CUDA's lazy module loading a
// kernel's module is otherwise loaded at its first launch, which can stall while a flag wait spins on another
// stream (the load waits for the device, the wait for work that the load holds up).
void preload_stream_kernels();

// The SM architectures this file was compiled for, e.g. "800,890,900" (nvcc's __CUDA_ARCH_LIST__).
std::string compiled_cuda_archs();

}  // namespace iso
