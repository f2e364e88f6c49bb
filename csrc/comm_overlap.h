// OverlapComm: one NCCL communicator that enqueues its collectives on a comm stream the caller owns, so
// all-reduces run beside compute.
//
// Ownership: the caller (Python: a torch.cuda.Stream) creates the comm stream and keeps it alive; this object
// never destroys it. Tensors recorded on that stream (record_stream) are freed later by torch's caching
// allocator, which records an event on the stream then: the stream must outlive them, and torch's streams do.
//
// Bounded blocking: the communicator is created non-blocking (ncclConfig_t.blocking = 0), so NCCL returns
// ncclInProgress instead of blocking in init, in a collective's first connection handshake and in finalize;
// every such call, and every host wait for the comm stream, is polled (watchdog.h) against `timeout_ns`. Past
// it, or on an NCCL asynchronous error, the communicator is aborted and the call throws a std::runtime_error
// naming the call and the cause. NCCL_COMM_BLOCKING=1 in the environment overrides the config; NCCL's own
// calls may then block without bound (the stream waits stay bounded).
//
// Threads: every method takes `mutex_`, and the polling loops release it between polls, so abort() from
// another thread is the way to end a wait early; the waiting call then throws "aborted". Nothing reads the
// communicator's state after release() without the lock.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include <cuda_runtime.h>
#include <nccl.h>

#include "signal_wait.h"
#include "watchdog.h"

namespace iso {

enum class DataType { float16, bfloat16, float32 };

class OverlapComm {
 public:
  // Joins the `world_size` ranks, waiting at most `timeout_ns`. `unique_id`: NCCL_UNIQUE_ID_BYTES bytes from
  // rank 0's nccl_unique_id(). `stream`: the comm stream (an int handle on `device`), owned by the caller.
  // Also loads this extension's kernels (see preload_stream_kernels).
  OverlapComm(const std::string& unique_id, int world_size, int rank, int device, std::uintptr_t stream,
              std::int64_t timeout_ns);
  ~OverlapComm();
  OverlapComm(const OverlapComm&) = delete;
  OverlapComm& operator=(const OverlapComm&) = delete;

  // The comm stream waits for everything enqueued on `caller_stream` so far.
  void comm_wait_for(std::uintptr_t caller_stream);
  // In-place sum over the ranks of `count` elements at device pointer `ptr`, on the comm stream.
  void all_reduce(std::uintptr_t ptr, std::int64_t count, DataType dtype);
  // The comm stream waits until the int32 at `flag_ptr` is >= target, for at most wait_timeout_ns.
  void wait_flag(std::uintptr_t flag_ptr, int target, std::int64_t wait_timeout_ns);
  // Blocks the host until the comm stream is idle (at most timeout_ns), then raises if a flag wait timed out
  // (sticky: every later call raises too) or NCCL reported an asynchronous error.
  void synchronize();
  // Waits for the comm stream, finalizes NCCL and frees everything, each step bounded by timeout_ns; aborts
  // instead when a step fails or times out. Idempotent.
  void destroy();
  // Aborts NCCL without waiting (error paths; safe from another thread); idempotent.
  void abort();
  bool closed();

  const int world_size;
  const int rank;
  const int device;

 private:
  void require_open_locked(const char* call) const;
  // Polls `step` (called under the lock) as watchdog.h says; on failure or timeout aborts and throws.
  template <typename Step>
  void watch(const char* what, Step&& step);
  // Completes an NCCL call that may have returned ncclInProgress (non-blocking mode).
  void finish_nccl(ncclResult_t result, const char* what);
  Progress stream_progress_locked();
  // synchronize()'s check. Sees only what the device has written so far: the comm stream must be idle.
  void check_status();
  std::string release(bool abort) noexcept;

  std::mutex mutex_;
  const std::int64_t timeout_ns_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;  // borrowed from the caller
  cudaEvent_t ready_ = nullptr;    // recorded and waited on at once (one suffices): caller -> comm
  WaitStatus* status_ = nullptr;   // mapped pinned host memory: the host reads it without a copy
  WaitStatus* status_device_ = nullptr;  // the same memory as the device addresses it
};

}  // namespace iso
