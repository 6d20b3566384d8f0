// tramway/trace/format.h — the trace file written by `tramway record` and `tramway live`.
//
// A file is a 64-byte FileHeader followed by chunks. Each chunk is a ChunkHeader and `size`
// bytes of payload; a reader skips chunk types it does not know. All integers are
// little-endian, as on x86-64. Guarantees: a file whose last chunk is kEnd was closed cleanly;
// a file cut short (the recorder killed) still reads up to its last complete chunk. Events of
// one thread appear in time order across that thread's kEvents chunks; threads interleave.
#pragma once

#include <cstdint>

namespace tramway::trace::format {

inline constexpr char kMagic[8] = {'T', 'R', 'A', 'M', 'W', 'A', 'Y', 'T'};
inline constexpr std::uint32_t kVersion = 1;

enum class Clock : std::uint32_t { tsc = 0, monotonic = 1 };

struct FileHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_size;       // sizeof(FileHeader); a reader skips to this offset
  std::uint64_t start_realtime_ns; // CLOCK_REALTIME when recording began
  std::uint64_t pid;               // the traced process
  Clock clock;                     // where the timestamps came from (they are ns either way)
  std::uint32_t reserved0;
  std::uint64_t reserved[3];
};
static_assert(sizeof(FileHeader) == 64);

enum class ChunkType : std::uint32_t {
  functions = 1,  // repeated {u64 address; u32 name_length; char name[name_length]}
  events = 2,     // {u32 tid; u32 count; Event events[count]}
  lost = 3,       // {u32 tid; u32 reserved; u64 count}: events this thread could not record
  thread = 4,     // {u32 tid; u32 name_length; char name[name_length]}
  end = 5,        // {u64 events; u64 lost}: totals, written when the file is closed cleanly
};

struct ChunkHeader {
  ChunkType type;
  std::uint32_t size;  // payload bytes after this header
};
static_assert(sizeof(ChunkHeader) == 8);

enum class EventKind : std::uint8_t {
  entry = 0,     // the function was entered
  exit = 1,      // it returned
  unwound = 2,   // it left without returning: an exception, longjmp or thread exit skipped it
};

// 16 bytes. `time_ns` counts from the start of the recording (monotonic).
struct Event {
  std::uint64_t time_ns;
  std::uint64_t word;  // bits 0-47: the function's entry address; bits 56-63: EventKind

  static constexpr std::uint64_t kAddressMask = (std::uint64_t{1} << 48) - 1;
  std::uint64_t address() const noexcept { return word & kAddressMask; }
  EventKind kind() const noexcept { return static_cast<EventKind>(word >> 56); }
  static constexpr std::uint64_t make_word(std::uint64_t address, EventKind kind) noexcept {
    return (address & kAddressMask) | (std::uint64_t{static_cast<std::uint8_t>(kind)} << 56);
  }
};
static_assert(sizeof(Event) == 16);

}  // namespace tramway::trace::format
