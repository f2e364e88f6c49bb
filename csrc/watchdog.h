// The bounded wait behind every blocking native call: poll a step until it finishes, fails or a deadline
// passes. Host-only and CUDA-free, so the same loop runs under a CPU test (bindings.cpp, _poll_for_test).
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

namespace iso {

// One poll's answer: still going, finished, or failed with a reason.
struct Progress {
  enum State { kPending, kDone, kFailed };
  State state = kPending;
  std::string error;  // kFailed only

  static Progress pending() { return {kPending, {}}; }
  static Progress done() { return {kDone, {}}; }
  static Progress failed(std::string why) { return {kFailed, std::move(why)}; }
};

// Calls `step` until it is done or failed, or `timeout` has passed since the first call; returns the last
// answer (kPending means the deadline passed). The pause between polls grows from 10 us to 1 ms: prompt for
// the short waits of an idle stream, cheap for a long one. The caller holds no lock across the pauses.
template <typename Step>
Progress poll_until(std::chrono::nanoseconds timeout, Step&& step) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + timeout;
  auto pause = std::chrono::microseconds(10);
  for (;;) {
    Progress progress = step();
    if (progress.state != Progress::kPending || Clock::now() >= deadline) return progress;
    std::this_thread::sleep_for(pause);
    pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(1));
  }
}

}  // namespace iso
