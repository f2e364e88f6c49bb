// OverlapComm: one NCCL communicator with its own comm stream, so all-reduces run beside compute.
//
// Every cross-stream handoff goes through a CUDA event; nothing here blocks the host except
// synchronize() and destroy(). Streams and device pointers arrive as integers (Python ints), so no
// libtorch is involved.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include <cuda_runtime.h>
#include <nccl.h>

#include "signal_wait.h"

namespace iso {

enum class DataType { float16, bfloat16, float32 };

class OverlapComm {
 public:
  // Completion events are a ring: ticket t uses slot t % kDoneEvents. Rewriting a slot that someone still
  // means to wait on is harmless: the new record is later on the same in-order comm stream, so waiting on
  // it waits for the old point too (only coarser). 16 covers every collective in flight in a layer.
  static constexpr int kDoneEvents = 16;

  // Blocks until all `world_size` ranks join (ncclCommInitRank). `unique_id`: NCCL_UNIQUE_ID_BYTES bytes
  // from rank 0's nccl_unique_id(). Lower `stream_priority` values run first (CUDA clamps to its range).
  OverlapComm(const std::string& unique_id, int world_size, int rank, int device, int stream_priority);
  ~OverlapComm();
  OverlapComm(const OverlapComm&) = delete;
  OverlapComm& operator=(const OverlapComm&) = delete;

  std::uintptr_t comm_stream() const;
  // The comm stream waits for everything enqueued on `caller_stream` so far.
  void comm_wait_for(std::uintptr_t caller_stream);
  // Marks the comm stream's current end; returns a ticket for caller_wait_for_comm.
  std::uint64_t record_done();
  // `caller_stream` waits for the comm stream up to `ticket` (default: everything enqueued so far).
  void caller_wait_for_comm(std::uintptr_t caller_stream, std::optional<std::uint64_t> ticket);
  // In-place sum over the ranks of `count` elements at device pointer `ptr`, on the comm stream.
  void all_reduce(std::uintptr_t ptr, std::int64_t count, DataType dtype);
  void group_start();
  void group_end();
  // The comm stream waits until the int32 at `flag_ptr` is >= target, for at most timeout_ns.
  void wait_flag(std::uintptr_t flag_ptr, int target, std::int64_t timeout_ns);
  // Raises if a flag wait timed out (clearing the report) or NCCL reported an asynchronous error.
  void check_status();
  // Blocks the host until the comm stream is idle, then check_status().
  void synchronize();
  // Zeroes `count` int32 flags at `ptr` on `stream`.
  void reset_flags(std::uintptr_t ptr, std::int64_t count, std::uintptr_t stream);
  // Finalizes NCCL (waiting for this rank's collectives) and frees everything; idempotent.
  void destroy();
  // Aborts NCCL without waiting (error paths); idempotent.
  void abort();
  bool closed() const { return comm_ == nullptr; }

  const int world_size;
  const int rank;
  const int device;

 private:
  void require_open() const;
  std::string release(bool abort) noexcept;

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;  // recorded on a caller stream and waited on at once: one suffices
  std::array<cudaEvent_t, kDoneEvents> done_{};
  std::uint64_t next_ticket_ = 0;
  WaitStatus* status_ = nullptr;  // mapped pinned host memory: the host reads it without a copy
  WaitStatus* status_device_ = nullptr;  // the same memory as the device addresses it
};

}  // namespace iso
