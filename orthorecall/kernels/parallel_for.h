// ParallelFor: the (batch) loop of a CPU kernel over XLA's intra-op threads.
#ifndef ORTHORECALL_KERNELS_PARALLEL_FOR_H_
#define ORTHORECALL_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace orthorecall {

// Runs fn(begin, end) over [0, count) on the calling thread and the intra-op
// pool. Chunks are claimed from a shared counter, so the caller never waits
// for a task that has not started (no deadlock when the pool is busy, e.g.
// with several devices), and a task that starts late finds nothing to do.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, const Fn& fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t grain = std::max<int64_t>(1, count / (threads * 16));
  const int64_t chunks = (count + grain - 1) / grain;
  if (threads == 1 || chunks == 1) {
    fn(0, count);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, chunks, grain, count, fn]() {
    for (;;) {
      const int64_t chunk = shared->next.fetch_add(1);
      if (chunk >= chunks) return;
      fn(chunk * grain, std::min(count, (chunk + 1) * grain));
      if (shared->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == chunks; });
}

}  // namespace orthorecall

#endif  // ORTHORECALL_KERNELS_PARALLEL_FOR_H_
