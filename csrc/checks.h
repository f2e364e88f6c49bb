// Error macros for the native boundary. Nothing here exits the process: every failure becomes a C++
// exception that pybind11 turns into a Python one (std::invalid_argument -> ValueError for bad arguments,
// std::runtime_error -> RuntimeError for CUDA/NCCL failures).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>
#include <nccl.h>

#include "nccl_lib.h"

namespace iso::detail {

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

}  // namespace iso::detail

// A caller's mistake (null pointer, bad size, rank out of range): ValueError naming the argument.
#define ISO_CHECK(cond, ...)                                                     \
  do {                                                                           \
    if (!(cond)) throw std::invalid_argument(::iso::detail::concat(__VA_ARGS__)); \
  } while (0)

// cudaGetLastError() clears a non-sticky error so that the next launch check does not report it again.
#define CUDA_CHECK(expr)                                                                          \
  do {                                                                                            \
    const cudaError_t iso_err_ = (expr);                                                          \
    if (iso_err_ != cudaSuccess) {                                                                \
      (void)cudaGetLastError();                                                                   \
      throw std::runtime_error(::iso::detail::concat(#expr, " failed: ", cudaGetErrorName(iso_err_), \
                                                     ": ", cudaGetErrorString(iso_err_)));        \
    }                                                                                             \
  } while (0)

namespace iso::detail {

// "what failed: class of error (detail)": ncclGetErrorString gives the class, ncclGetLastError the detail
// NCCL logged for it.
inline std::string nccl_failure(const char* what, ncclResult_t result) {
  const auto& api = ::iso::nccl();
  const char* last = api.ncclGetLastError(nullptr);
  const bool detail = last != nullptr && *last != '\0';
  return concat(what, " failed: ", api.ncclGetErrorString(result), detail ? " (" : "", detail ? last : "",
                detail ? ")" : "");
}

}  // namespace iso::detail

// Only ncclSuccess passes. Calls on a non-blocking communicator, which may return ncclInProgress, go through
// OverlapComm::finish_nccl instead, which polls them to completion against a deadline.
#define NCCL_CHECK(expr)                                                                   \
  do {                                                                                     \
    const ncclResult_t iso_res_ = (expr);                                                  \
    if (iso_res_ != ncclSuccess) throw std::runtime_error(::iso::detail::nccl_failure(#expr, iso_res_)); \
  } while (0)
