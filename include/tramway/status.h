// tramway/status.h — errors as values.
//
// Every fallible tramway call returns a Status or a Result<T>. A failed Status carries a
// message meant for the person running the program: it says what went wrong and, where
// possible, what to do about it. Nothing in tramway throws.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace tramway {

class [[nodiscard]] Status {
 public:
  Status() = default;  // success

  static Status error(std::string message, int sys_errno = 0) {
    Status s;
    s.ok_ = false;
    s.message_ = std::move(message);
    s.errno_ = sys_errno;
    return s;
  }

  bool ok() const noexcept { return ok_; }
  const std::string& message() const noexcept { return message_; }
  // The errno that caused the failure, or 0 when it did not come from a system call.
  int sys_errno() const noexcept { return errno_; }

 private:
  bool ok_ = true;
  int errno_ = 0;
  std::string message_;
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}               // NOLINT: implicit on purpose
  Result(Status error) : v_(std::move(error)) {}          // NOLINT: must be a failed Status

  bool ok() const noexcept { return v_.index() == 0; }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

  // The failure; a default (successful) Status when ok().
  Status status() const { return ok() ? Status() : std::get<1>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace tramway
