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
                         std::uintptr_t stream, std::int64_t timeout_ns)
    : world_size(world_size), rank(rank), device(device), timeout_ns_(timeout_ns) {
  ISO_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES, "unique_id must be ", NCCL_UNIQUE_ID_BYTES,
            " bytes (from nccl_unique_id()), got ", unique_id.size());
  ISO_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
  ISO_CHECK(rank >= 0 && rank < world_size, "rank must be in [0, world_size=", world_size, "), got ", rank);
  ISO_CHECK(device >= 0, "device must be >= 0, got ", device);
  ISO_CHECK(stream != 0, "stream must be the comm stream's handle, not 0 (the legacy default stream)");
  ISO_CHECK(timeout_ns > 0, "timeout_ns must be > 0, got ", timeout_ns);
  const NcclApi& api = nccl();
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  ISO_CHECK(device < count, "device ", device, " does not exist: ", count, " CUDA device(s) visible");

  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  DeviceGuard guard(device);
  stream_ = as_stream(stream);
  try {
    preload_stream_kernels();  // before any flag wait can spin (signal_wait.h)
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&status_), sizeof(WaitStatus), cudaHostAllocMapped));
    std::memset(status_, 0, sizeof(WaitStatus));
    CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&status_device_), status_, 0));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // NCCL returns ncclInProgress instead of blocking; finish_nccl bounds the wait
    ncclComm_t comm = nullptr;
    const ncclResult_t started = api.ncclCommInitRankConfig(&comm, world_size, id, rank, &config);
    // Kept even when init failed: current NCCL leaves a live handle behind a failed init, to be aborted.
    comm_ = comm;
    if (started != ncclSuccess && started != ncclInProgress) {
      throw std::runtime_error(detail::nccl_failure("ncclCommInitRankConfig", started));
    }
    ISO_CHECK(comm_ != nullptr, "ncclCommInitRankConfig returned no communicator");
  } catch (...) {
    (void)release(/*abort=*/true);
    throw;
  }
  finish_nccl(ncclInProgress, "ncclCommInitRankConfig");  // joins the ranks; aborts and throws on failure
}

OverlapComm::~OverlapComm() {
  // A safety net for a handle nobody closed: abort never waits on peers that may be gone.
  (void)release(/*abort=*/true);
}

void OverlapComm::require_open_locked(const char* call) const {
  if (comm_ == nullptr) {
    throw std::runtime_error(detail::concat("OverlapComm.", call, ": the communicator is closed (destroy() or ",
                                            "abort() was called, or a failure aborted it)"));
  }
}

template <typename Step>
void OverlapComm::watch(const char* what, Step&& step) {
  const Progress progress = poll_until(std::chrono::nanoseconds(timeout_ns_), [&] {
    std::lock_guard<std::mutex> lock(mutex_);
    if (comm_ == nullptr) return Progress::failed("the communicator was aborted while this call waited");
    return step();
  });
  if (progress.state == Progress::kDone) return;
  const std::string cause =
      progress.state == Progress::kFailed
          ? progress.error
          : detail::concat("not finished within the timeout of ", static_cast<double>(timeout_ns_) * 1e-9,
                           " s (a peer may be dead, stuck, or issuing different collectives)");
  const std::string abort_error = release(/*abort=*/true);
  throw std::runtime_error(detail::concat(what, " on rank ", rank, ": ", cause, "; the communicator was aborted",
                                          abort_error.empty() ? "" : " (", abort_error,
                                          abort_error.empty() ? "" : ")"));
}

void OverlapComm::finish_nccl(ncclResult_t result, const char* what) {
  if (result == ncclSuccess) return;
  if (result != ncclInProgress) {
    const std::string why = detail::nccl_failure(what, result);
    const std::string abort_error = release(/*abort=*/true);
    throw std::runtime_error(detail::concat(why, " on rank ", rank, "; the communicator was aborted",
                                            abort_error.empty() ? "" : " (", abort_error,
                                            abort_error.empty() ? "" : ")"));
  }
  watch(what, [&] {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t queried = nccl().ncclCommGetAsyncError(comm_, &state);
    if (queried != ncclSuccess) return Progress::failed(detail::nccl_failure("ncclCommGetAsyncError", queried));
    if (state == ncclInProgress) return Progress::pending();
    if (state == ncclSuccess) return Progress::done();
    return Progress::failed(detail::nccl_failure(what, state));
  });
}

Progress OverlapComm::stream_progress_locked() {
  ncclResult_t async = ncclSuccess;
  const ncclResult_t queried = nccl().ncclCommGetAsyncError(comm_, &async);
  if (queried != ncclSuccess) return Progress::failed(detail::nccl_failure("ncclCommGetAsyncError", queried));
  if (async != ncclSuccess && async != ncclInProgress) {
    return Progress::failed(detail::concat("NCCL asynchronous error: ", nccl().ncclGetErrorString(async)));
  }
  const cudaError_t state = cudaStreamQuery(stream_);
  if (state == cudaErrorNotReady || async == ncclInProgress) return Progress::pending();
  if (state == cudaSuccess) return Progress::done();
  (void)cudaGetLastError();
  return Progress::failed(detail::concat("the comm stream failed: ", cudaGetErrorName(state), ": ",
                                         cudaGetErrorString(state)));
}

void OverlapComm::comm_wait_for(std::uintptr_t caller_stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  require_open_locked("comm_wait_for");
  DeviceGuard guard(device);
  CUDA_CHECK(cudaEventRecord(ready_, as_stream(caller_stream)));
  CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
}

void OverlapComm::all_reduce(std::uintptr_t ptr, std::int64_t count, DataType dtype) {
  ISO_CHECK(ptr != 0, "ptr is a null device pointer");
  ISO_CHECK(count > 0, "count must be > 0, got ", count);
  ncclResult_t result = ncclSuccess;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    require_open_locked("all_reduce");
    DeviceGuard guard(device);
    void* data = reinterpret_cast<void*>(ptr);
    result = nccl().ncclAllReduce(data, data, static_cast<size_t>(count), to_nccl(dtype), ncclSum, comm_,
                                  stream_);
  }
  finish_nccl(result, "ncclAllReduce");  // the first collective waits for the peers' connection handshake
}

void OverlapComm::wait_flag(std::uintptr_t flag_ptr, int target, std::int64_t wait_timeout_ns) {
  ISO_CHECK(flag_ptr != 0, "flag_ptr is a null device pointer");
  ISO_CHECK(flag_ptr % alignof(int) == 0, "flag_ptr must be 4-byte aligned (an int32 element)");
  ISO_CHECK(wait_timeout_ns > 0, "timeout_ns must be > 0, got ", wait_timeout_ns);
  std::lock_guard<std::mutex> lock(mutex_);
  require_open_locked("wait_flag");
  DeviceGuard guard(device);
  launch_wait_flag(reinterpret_cast<const int*>(flag_ptr), target, static_cast<std::uint64_t>(wait_timeout_ns),
                   status_device_, stream_);
}

void OverlapComm::check_status() {
  std::lock_guard<std::mutex> lock(mutex_);
  require_open_locked("check_status");
  // Acquire: the details below were written before timed_out (signal_wait.cu).
  if (__atomic_load_n(&status_->timed_out, __ATOMIC_ACQUIRE) != 0) {
    const volatile WaitStatus* report = status_;
    throw std::runtime_error(detail::concat(
        "flag wait timed out on rank ", rank, ": ", report->timeouts, " wait(s) timed out; the first held ",
        report->observed, " < target ", report->target, " when its timeout expired, and the collective after ",
        "it ran on incomplete data"));
  }
  ncclResult_t async = ncclSuccess;
  NCCL_CHECK(nccl().ncclCommGetAsyncError(comm_, &async));
  if (async != ncclSuccess && async != ncclInProgress) {
    throw std::runtime_error(detail::concat("NCCL asynchronous error on rank ", rank, ": ",
                                            nccl().ncclGetErrorString(async)));
  }
}

void OverlapComm::synchronize() {
  watch("synchronize", [&] { return stream_progress_locked(); });
  check_status();
}

bool OverlapComm::closed() {
  std::lock_guard<std::mutex> lock(mutex_);
  return comm_ == nullptr;
}

void OverlapComm::destroy() {
  if (closed()) return;
  // Each step is bounded: a collective that never ends, or a finalize that waits on a dead peer, aborts.
  watch("destroy (waiting for the comm stream)", [&] { return stream_progress_locked(); });
  ncclResult_t finalizing = ncclSuccess;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    require_open_locked("destroy");
    DeviceGuard guard(device);
    finalizing = nccl().ncclCommFinalize(comm_);
  }
  finish_nccl(finalizing, "ncclCommFinalize");
  const std::string error = release(/*abort=*/false);
  if (!error.empty()) throw std::runtime_error(detail::concat("OverlapComm.destroy on rank ", rank, ": ", error));
}

void OverlapComm::abort() {
  const std::string error = release(/*abort=*/true);
  if (!error.empty()) throw std::runtime_error(detail::concat("OverlapComm.abort on rank ", rank, ": ", error));
}

// Frees whatever exists and keeps going after a failure; returns the first error. Without `abort` the
// communicator must be finalized already (destroy()). The comm stream is the caller's: it stays.
std::string OverlapComm::release(bool abort) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr && ready_ == nullptr && status_ == nullptr) return {};
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
      const ncclResult_t result = abort ? api.ncclCommAbort(comm_) : api.ncclCommDestroy(comm_);
      if (result != ncclSuccess && result != ncclInProgress) {
        note(abort ? "ncclCommAbort" : "ncclCommDestroy", api.ncclGetErrorString(result));
      }
      comm_ = nullptr;
    }
  } catch (const std::exception& e) {
    note("NCCL", e.what());
    comm_ = nullptr;
  }
  // A flag wait writes status_: free it only once the comm stream is idle. After an abort a wait may still be
  // spinning towards its timeout; then the 16 bytes are leaked rather than freed under it.
  const cudaError_t state = cudaStreamQuery(stream_);
  if (state != cudaSuccess && state != cudaErrorNotReady) note("comm stream", cudaGetErrorString(state));
  if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
  ready_ = nullptr;
  if (status_ != nullptr && state == cudaSuccess) (void)cudaFreeHost(status_);
  status_ = nullptr;
  status_device_ = nullptr;
  (void)cudaGetLastError();
  if (switched) (void)cudaSetDevice(previous);
  return first_error;
}

}  // namespace iso
