// iso_kernels._C: NCCL all-reduce on a dedicated comm stream, flag-gated starts, and timing helpers.
// Device pointers and CUDA streams cross as Python ints (tensor.data_ptr(), stream.cuda_stream); there is
// no libtorch here, so this builds and imports against CPU-only torch too.
#include <cstdint>
#include <memory>
#include <string>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>
#include <nccl.h>

#include "checks.h"
#include "comm_overlap.h"
#include "nccl_lib.h"
#include "signal_wait.h"

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
  } catch (const std::exception& e) {
    info["nccl_loaded"] = 0;
    info["nccl_library"] = py::none();
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

  py::class_<iso::OverlapComm>(m, "OverlapComm",
                               "An NCCL communicator with its own comm stream. Close it with destroy() "
                               "(or use it as a context manager); abort() is for error paths.")
      .def(py::init([](const py::bytes& unique_id, int world_size, int rank, int device,
                       int stream_priority) {
             std::string id = unique_id;
             iso::nccl();  // load NCCL while holding the GIL (the loader may consult importlib)
             py::gil_scoped_release nogil;  // ncclCommInitRank blocks until every rank has joined
             return std::make_unique<iso::OverlapComm>(id, world_size, rank, device, stream_priority);
           }),
           py::arg("unique_id"), py::arg("world_size"), py::arg("rank"), py::arg("device"),
           py::arg("stream_priority") = 0)
      .def_property_readonly("comm_stream", &iso::OverlapComm::comm_stream)
      .def_readonly("world_size", &iso::OverlapComm::world_size)
      .def_readonly("rank", &iso::OverlapComm::rank)
      .def_readonly("device", &iso::OverlapComm::device)
      .def_property_readonly("closed", &iso::OverlapComm::closed)
      .def("comm_wait_for", &iso::OverlapComm::comm_wait_for, py::arg("caller_stream"))
      .def("record_done", &iso::OverlapComm::record_done)
      .def("caller_wait_for_comm", &iso::OverlapComm::caller_wait_for_comm, py::arg("caller_stream"),
           py::arg("ticket") = py::none())
      .def("all_reduce", &iso::OverlapComm::all_reduce, py::arg("ptr"), py::arg("count"), py::arg("dtype"))
      .def("group_start", &iso::OverlapComm::group_start)
      .def("group_end", &iso::OverlapComm::group_end)
      .def("wait_flag", &iso::OverlapComm::wait_flag, py::arg("flag_ptr"), py::arg("target"),
           py::arg("timeout_ns"))
      .def("check_status", &iso::OverlapComm::check_status)
      .def("synchronize", &iso::OverlapComm::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("reset_flags", &iso::OverlapComm::reset_flags, py::arg("ptr"), py::arg("count"), py::arg("stream"))
      .def("destroy", &iso::OverlapComm::destroy, py::call_guard<py::gil_scoped_release>())
      .def("abort", &iso::OverlapComm::abort, py::call_guard<py::gil_scoped_release>())
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](iso::OverlapComm& self, const py::args&) {
        py::gil_scoped_release nogil;  // destroy() waits for the comm stream
        self.destroy();
      });
}
