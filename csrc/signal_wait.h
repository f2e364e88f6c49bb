// One-thread stream kernels: wait on a device flag (gating a collective on its producer's progress) and
// sleep for a wall-clock time (emulating a link on one GPU).
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace iso {

// Written by a timed-out flag wait into mapped pinned host memory; read (and cleared) by the host.
struct WaitStatus {
  int timed_out;  // set last, after the fields below are visible
  int observed;   // flag value when the wait gave up
  int target;
};

// `stream` waits until *flag >= target, or until timeout_ns elapsed, which it reports in *status.
void launch_wait_flag(const int* flag, int target, std::uint64_t timeout_ns, WaitStatus* status,
                      cudaStream_t stream);

// `stream` is busy for `nanoseconds` of wall-clock time (the current device's %globaltimer).
void launch_stream_sleep(std::uint64_t nanoseconds, cudaStream_t stream);

// The SM architectures this file was compiled for, e.g. "800,890,900" (nvcc's __CUDA_ARCH_LIST__).
std::string compiled_cuda_archs();

}  // namespace iso
