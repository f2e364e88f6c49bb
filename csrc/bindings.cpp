// iso_kernels._C: NCCL all-reduce on a dedicated comm stream, flag-gated starts, and timing helpers.
// Device pointers and CUDA streams cross as Python ints (tensor.data_ptr(), stream.cuda_stream); there is
// no libtorch here, so this builds and imports against CPU-only torch too.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>
#include <nccl.h>

#include "checks.h"
#include "comm_overlap.h"
#include "nccl_lib.h"
#include "signal_wait.h"
#include "watchdog.h"

namespace py = pybind11;

namespace {

// Without a driver cudaGetDeviceCount fails (cudaErrorInsufficientDriver) and leaves its output alone.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

py::dict build_info() {
  py::dict info;
  int runtime = 0, driver = 0;
  (void)cudaRuntimeGetVersion(&runtime);
  (void)cudaDriverGetVersion(&driver);  // 0 when no driver is installed
  info["cuda_compiled"] = CUDART_VERSION;
  info["cuda_runtime"] = runtime;
  info["driver"] = driver;
  info["nccl_compiled"] = NCCL_VERSION_CODE;
  try {
    const iso::NcclApi& api = iso::nccl();
    int loaded = 0;
    NCCL_CHECK(api.ncclGetVersion(&loaded));
    info["nccl_loaded"] = loaded;
    info["nccl_library"] = api.path;
    info["nccl_found_by"] = api.found_by;
  } catch (const std::exception& e) {
    info["nccl_loaded"] = 0;
    info["nccl_library"] = py::none();
    info["nccl_found_by"] = py::none();
    info["nccl_error"] = e.what();
  }
  info["archs"] = iso::compiled_cuda_archs();
  info["device_count"] = device_count();
  return info;
}

py::bytes nccl_unique_id() {
  ncclUniqueId id;
  NCCL_CHECK(iso::nccl().ncclGetUniqueId(&id));
  return py::bytes(id.internal, sizeof(id.internal));
}

// (least, greatest) priority of `device`'s streams; lower numbers run first.
std::pair<int, int> stream_priority_range(int device) {
  int current = 0, least = 0, greatest = 0;
  CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) CUDA_CHECK(cudaSetDevice(device));
  const cudaError_t err = cudaDeviceGetStreamPriorityRange(&least, &greatest);
  if (current != device) (void)cudaSetDevice(current);
  CUDA_CHECK(err);
  return {least, greatest};
}

// The watchdog's loop (watchdog.h) driven by a Python callable, so a CPU test can check its deadline logic:
// `step()` returns True (done), False (pending) or a str (failed). Returns "done", "failed: <str>" or
// "timed out".
std::string poll_for_test(const py::function& step, double timeout_s) {
  ISO_CHECK(timeout_s > 0, "timeout_s must be > 0, got ", timeout_s);
  py::gil_scoped_release nogil;
  const iso::Progress progress = iso::poll_until(
      std::chrono::nanoseconds(static_cast<std::int64_t>(timeout_s * 1e9)), [&] {
        py::gil_scoped_acquire gil;
        py::object answer = step();
        if (py::isinstance<py::str>(answer)) return iso::Progress::failed(answer.cast<std::string>());
        return answer.cast<bool>() ? iso::Progress::done() : iso::Progress::pending();
      });
  switch (progress.state) {
    case iso::Progress::kDone:
      return "done";
    case iso::Progress::kFailed:
      return "failed: " + progress.error;
    case iso::Progress::kPending:
      break;
  }
  return "timed out";
}

// Deletes an OverlapComm without the GIL: its destructor aborts NCCL, which can take a while.
struct DeleteWithoutGil {
  void operator()(iso::OverlapComm* comm) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release nogil;
      delete comm;
    } else {
      delete comm;
    }
  }
};
using OverlapCommHolder = std::unique_ptr<iso::OverlapComm, DeleteWithoutGil>;

void stream_sleep(std::uintptr_t stream, std::int64_t nanoseconds) {
  ISO_CHECK(nanoseconds >= 0, "nanoseconds must be >= 0, got ", nanoseconds);
  iso::launch_stream_sleep(static_cast<std::uint64_t>(nanoseconds), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "iso_kernels native extension: NCCL all-reduce on its own stream, flag waits, stream sleep";
  m.attr("NCCL_UNIQUE_ID_BYTES") = NCCL_UNIQUE_ID_BYTES;

  m.def("build_info", &build_info,
        "Versions compiled and loaded: cuda_compiled, cuda_runtime, driver (0 = none), nccl_compiled, "
        "nccl_loaded (0 = libnccl not loadable, see nccl_error), nccl_library, archs, device_count.");
  m.def("device_count", &device_count, "Visible CUDA devices; 0 without a driver.");
  m.def("nccl_unique_id", &nccl_unique_id,
        "A fresh NCCL unique id (bytes) for rank 0 to share; needs no GPU.");
  m.def("stream_sleep", &stream_sleep, py::arg("stream"), py::arg("nanoseconds"),
        "Occupy `stream` (int handle, on the current device) for `nanoseconds` of wall-clock time.");

  py::enum_<iso::DataType>(m, "DataType")
      .value("float16", iso::DataType::float16)
      .value("bfloat16", iso::DataType::bfloat16)
      .value("float32", iso::DataType::float32);

  m.def("stream_priority_range", &stream_priority_range, py::arg("device"),
        "(least, greatest) stream priority of `device`; lower numbers run first.");
  m.def("_poll_for_test", &poll_for_test, py::arg("step"), py::arg("timeout_s"),
        "The watchdog's polling loop around a Python step (True: done, False: pending, str: failed); "
        "returns 'done', 'failed: ...' or 'timed out'. For tests.");

  using nogil = py::call_guard<py::gil_scoped_release>;
  py::class_<iso::OverlapComm, OverlapCommHolder>(
      m, "OverlapComm",
      "An NCCL communicator that enqueues on a comm stream the caller owns. Every blocking call is bounded by "
      "timeout_ns (then it aborts and raises). Close it with destroy() (or use it as a context manager; "
      "the body raising aborts instead); abort() is for error paths and may come from another thread.")
      .def(py::init([](const py::bytes& unique_id, int world_size, int rank, int device, std::uintptr_t stream,
                       std::int64_t timeout_ns) {
             std::string id = unique_id;
             iso::nccl();  // load NCCL while holding the GIL (the loader may consult importlib)
             py::gil_scoped_release nogil;  // joining the ranks waits for every peer
             return OverlapCommHolder(new iso::OverlapComm(id, world_size, rank, device, stream, timeout_ns));
           }),
           py::arg("unique_id"), py::arg("world_size"), py::arg("rank"), py::arg("device"), py::arg("stream"),
           py::arg("timeout_ns"))
      .def_property_readonly("closed", &iso::OverlapComm::closed)
      .def("comm_wait_for", &iso::OverlapComm::comm_wait_for, py::arg("caller_stream"))
      // The first collective can wait for the peers' connection handshake.
      .def("all_reduce", &iso::OverlapComm::all_reduce, py::arg("ptr"), py::arg("count"), py::arg("dtype"), nogil())
      .def("wait_flag", &iso::OverlapComm::wait_flag, py::arg("flag_ptr"), py::arg("target"),
           py::arg("timeout_ns"))
      .def("synchronize", &iso::OverlapComm::synchronize, nogil())
      .def("destroy", &iso::OverlapComm::destroy, nogil())
      .def("abort", &iso::OverlapComm::abort, nogil())
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](iso::OverlapComm& self, const py::object& exc_type, const py::object&,
                          const py::object&) {
        const bool failed = !exc_type.is_none();
        py::gil_scoped_release nogil;  // destroy() waits for the comm stream and NCCL's finalize
        if (failed) {
          self.abort();  // the body raised: peers may never match this rank's collectives
        } else {
          self.destroy();
        }
      });
}
