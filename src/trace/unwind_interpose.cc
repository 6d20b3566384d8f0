// Wrappers of the C++ unwinder's entry points, so that exceptions, rethrows and pthread_exit
// can walk through frames whose return address the tracer swapped for its return stub.
//
// Before an unwind starts, every original return address of the thread is put back (the
// stub's CFI cannot name it); after a catch, the frames still live are hijacked again and the
// unwound ones closed. Each wrapper then calls the next definition (RTLD_NEXT: libgcc_s,
// libstdc++, libc). This file is compiled into libtramway_trace and into the preloaded agent:
// a preloaded library comes before the program's libraries in symbol lookup, its own
// dependencies after them, so the agent must carry the wrappers itself. Not covered: thread
// cancellation (glibc unwinds through a handle of its own to libgcc_s): a cancelled thread
// stops unwinding at the newest traced frame and exits without running the destructors of
// older frames.
#include <dlfcn.h>
#include <pthread.h>
#include <unwind.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

extern "C" {
void tramway_trace_before_unwind() noexcept;
void tramway_trace_after_catch(std::uintptr_t caller_sp) noexcept;
}

namespace {

template <class Fn>
Fn next(const char* name) noexcept {
  void* f = ::dlsym(RTLD_NEXT, name);
  if (!f) {
    std::fprintf(stderr, "tramway: cannot find the real %s: %s\n", name, ::dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(f);
}

}  // namespace

extern "C" {

_Unwind_Reason_Code _Unwind_RaiseException(_Unwind_Exception* exception) {
  static const auto real = next<_Unwind_Reason_Code (*)(_Unwind_Exception*)>("_Unwind_RaiseException");
  tramway_trace_before_unwind();
  return real(exception);
}

_Unwind_Reason_Code _Unwind_Resume_or_Rethrow(_Unwind_Exception* exception) {
  static const auto real = next<_Unwind_Reason_Code (*)(_Unwind_Exception*)>("_Unwind_Resume_or_Rethrow");
  tramway_trace_before_unwind();
  return real(exception);
}

// A cleanup (destructor) between throw and catch may have caught an exception of its own,
// which hijacked the live frames again: restore before unwinding on.
void _Unwind_Resume(_Unwind_Exception* exception) {
  static const auto real = next<void (*)(_Unwind_Exception*)>("_Unwind_Resume");
  tramway_trace_before_unwind();
  real(exception);
  __builtin_unreachable();
}

void* __cxa_begin_catch(void* exception) noexcept {
  static const auto real = next<void* (*)(void*)>("__cxa_begin_catch");
  // The catching frame's stack pointer: frames below it were unwound.
  tramway_trace_after_catch(reinterpret_cast<std::uintptr_t>(__builtin_dwarf_cfa()));
  return real(exception);
}

void pthread_exit(void* value) {
  static const auto real = next<void (*)(void*)>("pthread_exit");
  tramway_trace_before_unwind();
  real(value);
  __builtin_unreachable();
}

}  // extern "C"
