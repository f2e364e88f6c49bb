#include "comm_overlap.h"

#include <cstring>

#include "checks.h"
#include "nccl_lib.h"

namespace iso {
namespace {

// Makes `device` current for one call and restores the caller's device (torch's current device lives in
// the same driver context state, so leaving ours behind would move torch's too).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device_) CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (previous_ != device_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

ncclDataType_t to_nccl(DataType dtype) {
  switch (dtype) {
    case DataType::float16:
      return ncclFloat16;
    case DataType::bfloat16:
      return ncclBfloat16;
    case DataType::float32:
      return ncclFloat32;
  }
  throw std::invalid_argument("dtype is not a DataType");
}

cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace

OverlapComm::OverlapComm(const std::string& unique_id, int world_size, int rank, int device,
                         int stream_priority)
    : world_size(world_size), rank(rank), device(device) {
  ISO_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES, "unique_id must be ", NCCL_UNIQUE_ID_BYTES,
            " bytes (from nccl_unique_id()), got ", unique_id.size());
  ISO_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
  ISO_CHECK(rank >= 0 && rank < world_size, "rank must be in [0, world_size=", world_size, "), got ", rank);
  ISO_CHECK(device >= 0, "device must be >= 0, got ", device);
  const NcclApi& api = nccl();
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  ISO_CHECK(device < count, "device ", device, " does not exist: ", count, " CUDA device(s) visible");

  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  DeviceGuard guard(device);
  try {
    CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, stream_priority));
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    for (auto& event : done_) CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&status_), sizeof(WaitStatus), cudaHostAllocMapped));
    std::memset(status_, 0, sizeof(WaitStatus));
    CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&status_device_), status_, 0));
    // Kept local until it succeeds: a failed init's output handle is not ours to abort.
    ncclComm_t comm = nullptr;
    NCCL_CHECK(api.ncclCommInitRank(&comm, world_size, id, rank));
    comm_ = comm;
  } catch (...) {
    (void)release(/*abort=*/true);
    throw;
  }
}

OverlapComm::~OverlapComm() {
  // A safety net for a handle nobody closed: abort never waits on peers that may be gone.
  (void)release(/*abort=*/true);
}

void OverlapComm::require_open() const {
  if (comm_ == nullptr) throw std::runtime_error("OverlapComm is closed (destroy() or abort() was called)");
}

std::uintptr_t OverlapComm::comm_stream() const {
  require_open();
  return reinterpret_cast<std::uintptr_t>(stream_);
}

void OverlapComm::comm_wait_for(std::uintptr_t caller_stream) {
  require_open();
  DeviceGuard guard(device);
  CUDA_CHECK(cudaEventRecord(ready_, as_stream(caller_stream)));
  CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
}

std::uint64_t OverlapComm::record_done() {
  require_open();
  DeviceGuard guard(device);
  const std::uint64_t ticket = next_ticket_;
  CUDA_CHECK(cudaEventRecord(done_[ticket % kDoneEvents], stream_));
  ++next_ticket_;
  return ticket;
}

void OverlapComm::caller_wait_for_comm(std::uintptr_t caller_stream, std::optional<std::uint64_t> ticket) {
  require_open();
  const std::uint64_t t = ticket ? *ticket : record_done();
  ISO_CHECK(t < next_ticket_, "ticket ", t, " was never issued by record_done()");
  DeviceGuard guard(device);
  CUDA_CHECK(cudaStreamWaitEvent(as_stream(caller_stream), done_[t % kDoneEvents], 0));
}

void OverlapComm::all_reduce(std::uintptr_t ptr, std::int64_t count, DataType dtype) {
  require_open();
  ISO_CHECK(ptr != 0, "ptr is a null device pointer");
  ISO_CHECK(count > 0, "count must be > 0, got ", count);
  DeviceGuard guard(device);
  void* data = reinterpret_cast<void*>(ptr);
  NCCL_CHECK(nccl().ncclAllReduce(data, data, static_cast<size_t>(count), to_nccl(dtype), ncclSum, comm_,
                                  stream_));
}

void OverlapComm::group_start() {
  require_open();
  NCCL_CHECK(nccl().ncclGroupStart());
}

void OverlapComm::group_end() {
  require_open();
  DeviceGuard guard(device);
  NCCL_CHECK(nccl().ncclGroupEnd());
}

void OverlapComm::wait_flag(std::uintptr_t flag_ptr, int target, std::int64_t timeout_ns) {
  require_open();
  ISO_CHECK(flag_ptr != 0, "flag_ptr is a null device pointer");
  ISO_CHECK(flag_ptr % alignof(int) == 0, "flag_ptr must be 4-byte aligned (an int32 element)");
  ISO_CHECK(timeout_ns > 0, "timeout_ns must be > 0, got ", timeout_ns);
  DeviceGuard guard(device);
  launch_wait_flag(reinterpret_cast<const int*>(flag_ptr), target, static_cast<std::uint64_t>(timeout_ns),
                   status_device_, stream_);
}

void OverlapComm::check_status() {
  require_open();
  volatile WaitStatus* report = status_;
  if (report->timed_out != 0) {
    const int observed = report->observed;
    const int target = report->target;
    report->timed_out = 0;
    throw std::runtime_error(detail::concat(
        "flag wait timed out: the flag held ", observed, " < target ", target,
        " when its timeout expired; the collective after it ran on incomplete data"));
  }
  ncclResult_t async = ncclSuccess;
  NCCL_CHECK(nccl().ncclCommGetAsyncError(comm_, &async));
  if (async != ncclSuccess && async != ncclInProgress) {
    throw std::runtime_error(detail::concat("NCCL asynchronous error: ", nccl().ncclGetErrorString(async)));
  }
}

void OverlapComm::synchronize() {
  require_open();
  DeviceGuard guard(device);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  check_status();
}

void OverlapComm::reset_flags(std::uintptr_t ptr, std::int64_t count, std::uintptr_t stream) {
  ISO_CHECK(ptr != 0, "ptr is a null device pointer");
  ISO_CHECK(count > 0, "count must be > 0, got ", count);
  DeviceGuard guard(device);
  CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(ptr), 0, static_cast<size_t>(count) * sizeof(int),
                             as_stream(stream)));
}

void OverlapComm::destroy() {
  const std::string error = release(/*abort=*/false);
  if (!error.empty()) throw std::runtime_error("OverlapComm.destroy: " + error);
}

void OverlapComm::abort() {
  const std::string error = release(/*abort=*/true);
  if (!error.empty()) throw std::runtime_error("OverlapComm.abort: " + error);
}

// Frees whatever exists, in dependency order, and keeps going after a failure; returns the first error.
std::string OverlapComm::release(bool abort) noexcept {
  if (comm_ == nullptr && stream_ == nullptr && status_ == nullptr) return {};
  std::string first_error;
  auto note = [&](const char* what, const char* why) {
    if (first_error.empty()) first_error = detail::concat(what, ": ", why);
  };
  int previous = -1;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device &&
                        cudaSetDevice(device) == cudaSuccess;
  try {
    if (comm_ != nullptr) {
      const NcclApi& api = nccl();
      ncclResult_t result = ncclSuccess;
      if (abort) {
        result = api.ncclCommAbort(comm_);
      } else {
        result = api.ncclCommFinalize(comm_);
        // After a failed finalize (a peer or the network broke) destroy can block on the broken comm; abort
        // is NCCL's path out of an error.
        result = result == ncclSuccess ? api.ncclCommDestroy(comm_) : api.ncclCommAbort(comm_);
      }
      if (result != ncclSuccess) {
        note(abort ? "ncclCommAbort" : "ncclCommFinalize/Destroy", api.ncclGetErrorString(result));
      }
      comm_ = nullptr;
    }
  } catch (const std::exception& e) {
    note("NCCL", e.what());
    comm_ = nullptr;
  }
  // The wait kernel writes status_: free it only once the comm stream is idle. After an abort a wait may
  // still be spinning towards its timeout; then the 12 bytes are leaked rather than freed under it.
  bool idle = true;
  if (stream_ != nullptr) {
    const cudaError_t state = abort ? cudaStreamQuery(stream_) : cudaStreamSynchronize(stream_);
    idle = state == cudaSuccess;
    if (!idle && state != cudaErrorNotReady) note("comm stream", cudaGetErrorString(state));
  }
  for (auto& event : done_) {
    if (event != nullptr) (void)cudaEventDestroy(event);
    event = nullptr;
  }
  if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
  ready_ = nullptr;
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  stream_ = nullptr;
  if (status_ != nullptr && idle) (void)cudaFreeHost(status_);
  status_ = nullptr;
  status_device_ = nullptr;
  (void)cudaGetLastError();
  if (switched) (void)cudaSetDevice(previous);
  return first_error;
}

}  // namespace iso
