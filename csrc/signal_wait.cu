// Memory ordering of the flag wait (why the collective that follows reads the producer's finished data):
//
//  1. Producer (e.g. a gemm_signal tile): stores its output, then atomic_add(sem=release, scope=gpu) on its
//     row group's counter. The release orders the tile's stores before the increment, at gpu scope.
//  2. Waiter (wait_flag_kernel): ld.acquire.gpu of the counter. Reading a value >= target means it read an
//     increment at or after the last one needed; each release RMW heads a release sequence that the later
//     RMWs on the same counter continue, so this acquire synchronizes with every contributing tile, and
//     all their stores happen-before the waiter's return.
//  3. Collective: launched after the wait kernel in stream order. Kernel completion and the next kernel's
//     start in one stream carry that happens-before onward (causality order is transitive), so NCCL's
//     kernel, and through its own release/acquire handshakes the peers that read our buffer, see the data.
//
// A relaxed (volatile) load would need a __threadfence() after it to play the acquire's part; the
// ld.acquire says it in one instruction (sm_70+).
//
// Bounded waiting: the wait gives up after timeout_ns (%globaltimer, wall clock) and reports through a
// status word in mapped pinned host memory, so a producer that never comes (a lost launch, or under CUDA's
// lazy loading a producer module that cannot load while this kernel occupies the device) surfaces as a
// RuntimeError from synchronize() instead of a hung GPU. The collective then runs on incomplete data.
//
// The report's ordering: the kernel writes `observed`/`target`, __threadfence_system(), then `timed_out`;
// the host loads `timed_out` with acquire semantics (an ldar on aarch64/GH200, where a plain load could be
// reordered before it) and only then reads the details. Only the first timeout writes them; the host never
// writes the status, so no host store can race a later wait's report.
#include "signal_wait.h"

#include "checks.h"

namespace iso {
namespace {

// Pause between polls: ~0.1-0.3 us of added start latency, small next to an NCCL launch (several us),
// while the spinning warp stays out of the memory system most of the time.
constexpr unsigned kPollSleepNs = 128;

__device__ __forceinline__ std::uint64_t global_timer_ns() {
  std::uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

__device__ __forceinline__ int load_acquire_gpu(const int* ptr) {
  int value;
  asm volatile("ld.acquire.gpu.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

__global__ void wait_flag_kernel(const int* flag, int target, std::uint64_t timeout_ns, WaitStatus* status) {
  const std::uint64_t start = global_timer_ns();
  int value = load_acquire_gpu(flag);
  while (value < target) {
    if (global_timer_ns() - start >= timeout_ns) {
      volatile WaitStatus* report = status;
      report->timeouts = report->timeouts + 1;  // waits are serialised on one stream: no atomic needed
      if (report->timed_out == 0) {
        report->observed = value;
        report->target = target;
        __threadfence_system();  // the details reach host memory before the flag that announces them
        report->timed_out = 1;
      }
      __threadfence_system();
      return;
    }
    __nanosleep(kPollSleepNs);
    value = load_acquire_gpu(flag);
  }
}

__global__ void stream_sleep_kernel(std::uint64_t nanoseconds) {
  const std::uint64_t start = global_timer_ns();
  while (global_timer_ns() - start < nanoseconds) __nanosleep(kPollSleepNs);
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(detail::concat("launching ", kernel, " failed: ", cudaGetErrorName(err), ": ",
                                            cudaGetErrorString(err)));
  }
}

}  // namespace

void launch_wait_flag(const int* flag, int target, std::uint64_t timeout_ns, WaitStatus* status,
                      cudaStream_t stream) {
  wait_flag_kernel<<<1, 1, 0, stream>>>(flag, target, timeout_ns, status);
  check_launch("wait_flag_kernel");
}

void launch_stream_sleep(std::uint64_t nanoseconds, cudaStream_t stream) {
  stream_sleep_kernel<<<1, 1, 0, stream>>>(nanoseconds);
  check_launch("stream_sleep_kernel");
}

void preload_stream_kernels() {
  // cudaFuncGetAttributes loads the function's module (a no-op once loaded).
  cudaFuncAttributes attributes{};
  CUDA_CHECK(cudaFuncGetAttributes(&attributes, wait_flag_kernel));
  CUDA_CHECK(cudaFuncGetAttributes(&attributes, stream_sleep_kernel));
}

#define ISO_STRINGIFY_(...) #__VA_ARGS__
#define ISO_STRINGIFY(...) ISO_STRINGIFY_(__VA_ARGS__)

std::string compiled_cuda_archs() { return ISO_STRINGIFY(__CUDA_ARCH_LIST__); }

}  // namespace iso
