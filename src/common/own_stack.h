// common/own_stack.h — threads of tramway whose stacks tramway maps and unmaps itself.
//
// glibc keeps the stacks of the threads it created in a cache after they end, mapped; an
// ejected agent must leave no mapping behind, so its threads (the control server, the grace
// engine's callback thread, the recorder's flusher) run on stacks of their own, unmapped once
// the thread has been joined. Header-only: the control library does not link libtramway.
#pragma once

#include <pthread.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstddef>

namespace tramway::common {

class OwnStackThread {
 public:
  static constexpr std::size_t kStackSize = 256 * 1024;

  // Starts fn(arg) with every signal in `mask` blocked (the thread's mask from its first
  // instruction on). Returns 0 or an errno value.
  int start(void* (*fn)(void*), void* arg, const sigset_t* mask) noexcept {
    void* stack = mmap(nullptr, kStackSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return errno;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstack(&attr, stack, kStackSize);
    sigset_t old;
    if (mask) pthread_sigmask(SIG_SETMASK, mask, &old);
    const int err = pthread_create(&thread_, &attr, fn, arg);
    if (mask) pthread_sigmask(SIG_SETMASK, &old, nullptr);
    pthread_attr_destroy(&attr);
    if (err != 0) {
      munmap(stack, kStackSize);
      return err;
    }
    stack_ = stack;
    return 0;
  }
  bool running() const noexcept { return stack_ != nullptr; }
  pthread_t handle() const noexcept { return thread_; }
  // Waits for the thread to end and unmaps its stack.
  void join() noexcept {
    if (!stack_) return;
    pthread_join(thread_, nullptr);
    munmap(stack_, kStackSize);
    stack_ = nullptr;
  }
  // In a fork()ed child: the thread is not there, its stack (a copy) is ours to unmap.
  void forget_after_fork() noexcept {
    if (stack_) munmap(stack_, kStackSize);
    stack_ = nullptr;
  }

 private:
  pthread_t thread_{};
  void* stack_ = nullptr;
};

}  // namespace tramway::common
