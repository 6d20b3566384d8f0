// Reading trace files (tramway/trace/format.h) chunk by chunk into a TraceSink.
//
// The file is streamed, never loaded whole: a recording can be many GiB, and only the
// sink decides what to keep. A file cut short reads up to its last complete chunk; a damaged
// chunk whose size is still plausible is skipped with a warning, so one bad chunk does not
// cost the rest of the recording.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "common/format.h"
#include "trace/report/report.h"

namespace tramway::trace::report {
namespace {

const char* file_kind(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "a special file";
}

using format::ChunkHeader;
using format::ChunkType;
using format::Event;
using format::FileHeader;

constexpr std::uint64_t kBigFile = 64ull << 20;          // always worth a progress line
constexpr std::int64_t kSlowRead = 500'000'000;         // ns before a smaller file gets one
constexpr std::int64_t kProgressInterval = 100'000'000;  // ns between redraws

std::string errno_text(int e) { return std::strerror(e); }

// The percentage line: drawn with \r on a terminal, erased when reading ends.
class Progress {
 public:
  Progress(const ReadOptions& options, const std::string& path, std::uint64_t file_bytes)
      : out_(options.diagnostics), path_(path), bytes_(file_bytes), start_(common::monotonic_ns()) {
    enabled_ = options.progress && out_ != nullptr && isatty(fileno(out_)) && file_bytes > 0;
  }
  ~Progress() {
    if (drawn_) std::fprintf(out_, "\r%*s\r", static_cast<int>(width_), "");
  }
  void update(std::uint64_t offset) {
    if (!enabled_) return;
    const std::int64_t now = common::monotonic_ns();
    if (!drawn_ && bytes_ <= kBigFile && now - start_ < kSlowRead) return;
    if (drawn_ && now - last_draw_ < kProgressInterval) return;
    const unsigned pct = static_cast<unsigned>(offset * 100 / bytes_);
    if (drawn_ && pct == last_pct_) return;
    const int n = std::fprintf(out_, "\rreading %s: %u%%", path_.c_str(), pct);
    if (n > 0 && static_cast<std::size_t>(n) > width_) width_ = static_cast<std::size_t>(n);
    std::fflush(out_);
    drawn_ = true;
    last_draw_ = now;
    last_pct_ = pct;
  }

 private:
  std::FILE* out_;
  const std::string& path_;
  std::uint64_t bytes_;
  std::int64_t start_, last_draw_ = 0;
  bool enabled_ = false, drawn_ = false;
  unsigned last_pct_ = 0;
  std::size_t width_ = 0;
};

class Reader {
 public:
  Reader(std::FILE* f, TraceSink& sink, const ReadOptions& options, ReadSummary& summary)
      : f_(f), sink_(sink), options_(options), s_(summary) {}

  Status read() {
    if (Status st = read_header(); !st.ok()) return st;
    Progress progress(options_, s_.path, s_.file_bytes);
    std::uint64_t offset = s_.header.header_size;
    std::uint64_t lost_chunks = 0, end_lost = 0;
    while (offset < s_.file_bytes) {
      progress.update(offset);
      const std::uint64_t remaining = s_.file_bytes - offset;
      ChunkHeader ch{};
      if (remaining < sizeof ch) break;  // a partial chunk header: cut short
      if (Status st = read_exact(&ch, sizeof ch, offset); !st.ok()) return st;
      if (ch.size > remaining - sizeof ch) break;  // payload runs past the end: cut short
      const std::uint64_t payload_at = offset + sizeof ch;
      const std::uint64_t next = payload_at + ch.size;
      Status st;
      switch (ch.type) {
        case ChunkType::functions: st = functions(ch.size, payload_at); break;
        case ChunkType::events: st = events(ch.size, payload_at); break;
        case ChunkType::lost: st = lost(ch.size, payload_at, lost_chunks); break;
        case ChunkType::thread: st = thread(ch.size, payload_at); break;
        case ChunkType::end: st = end(ch.size, payload_at, end_lost); break;
        default: st = skip(ch.size); break;  // a newer writer's chunk: not ours to read
      }
      if (!st.ok()) return st;
      offset = next;
      s_.complete_bytes = offset;
      if (s_.closed_cleanly) break;
    }
    s_.lost = std::max(lost_chunks, end_lost);
    if (s_.closed_cleanly) {
      if (s_.complete_bytes < s_.file_bytes)
        warn("trace file " + s_.path + " has " + std::to_string(s_.file_bytes - s_.complete_bytes) +
             " bytes after its end chunk; they were ignored");
    } else {
      s_.truncated = true;
      const std::uint64_t ignored = s_.file_bytes - s_.complete_bytes;
      if (ignored > 0)
        warn("trace file " + s_.path + " is truncated (the recording was cut short); reporting the " +
             std::to_string(s_.events) + " events before byte " + std::to_string(s_.complete_bytes) +
             " and ignoring the last " + std::to_string(ignored) + " bytes");
      else
        warn("trace file " + s_.path + " has no end chunk (the recording was cut short); reporting " +
             "its " + std::to_string(s_.events) + " events");
    }
    return {};
  }

 private:
  Status read_header() {
    FileHeader& h = s_.header;
    const std::size_t got = std::fread(&h, 1, sizeof h, f_);
    if (std::ferror(f_)) return read_error();
    if (got < sizeof h.magic || std::memcmp(h.magic, format::kMagic, sizeof h.magic) != 0)
      return Status::error(s_.path + " is not a tramway trace file (no TRAMWAYT magic): pass a file " +
                           "written by `tramway record` or `tramway live`");
    if (got < offsetof(FileHeader, header_size) + sizeof h.header_size)
      return Status::error("trace file " + s_.path + " is cut short inside its header (" +
                           std::to_string(s_.file_bytes) + " bytes): there is nothing to report");
    if (h.version != format::kVersion)
      return Status::error(s_.path + ": trace file version " + std::to_string(h.version) +
                           ", this tramway reads version " + std::to_string(format::kVersion) +
                           ": re-record it or use the matching tramway");
    if (h.header_size < sizeof h)
      return Status::error("trace file " + s_.path + " is damaged: its header_size is " +
                           std::to_string(h.header_size) + ", less than the " + std::to_string(sizeof h) +
                           " bytes of a version-1 header");
    if (got < sizeof h || h.header_size > s_.file_bytes)
      return Status::error("trace file " + s_.path + " is cut short inside its header (" +
                           std::to_string(s_.file_bytes) + " bytes): there is nothing to report");
    if (h.header_size > sizeof h && fseeko(f_, static_cast<off_t>(h.header_size), SEEK_SET) != 0)
      return read_error();
    s_.complete_bytes = h.header_size;
    return {};
  }

  Status functions(std::uint32_t size, std::uint64_t at) {
    if (Status st = read_payload(size, at); !st.ok()) return st;
    std::size_t i = 0;
    while (i < bytes_.size()) {
      std::uint64_t address;
      std::uint32_t length;
      if (bytes_.size() - i < sizeof address + sizeof length) break;
      std::memcpy(&address, bytes_.data() + i, sizeof address);
      std::memcpy(&length, bytes_.data() + i + sizeof address, sizeof length);
      i += sizeof address + sizeof length;
      if (length > bytes_.size() - i) {
        i -= sizeof address + sizeof length;
        break;
      }
      sink_.function(address, std::string_view(bytes_.data() + i, length));
      i += length;
    }
    if (i < bytes_.size())
      damaged("functions", at, "its last entry runs past the chunk; the names before it were read");
    return {};
  }

  Status events(std::uint32_t size, std::uint64_t at) {
    std::uint32_t head[2];  // tid, count
    if (size < sizeof head) {
      damaged("events", at, "it is too small for its header; skipped");
      return skip(size);
    }
    if (Status st = read_exact(head, sizeof head, at); !st.ok()) return st;
    const std::uint64_t payload = size - sizeof head;
    if (payload != std::uint64_t{head[1]} * sizeof(Event)) {
      damaged("events", at, "its size holds " + std::to_string(payload / sizeof(Event)) +
                                " events but it counts " + std::to_string(head[1]) + "; skipped");
      return skip(payload);
    }
    events_.resize(head[1]);
    if (Status st = read_exact(events_.data(), payload, at + sizeof head); !st.ok()) return st;
    sink_.events(head[0], events_);
    s_.events += head[1];
    return {};
  }

  Status lost(std::uint32_t size, std::uint64_t at, std::uint64_t& total) {
    if (Status st = read_payload(size, at); !st.ok()) return st;
    std::uint32_t tid;
    std::uint64_t count;
    if (bytes_.size() < 16) {
      damaged("lost", at, "it is too small; skipped (some events may have been lost unreported)");
      return {};
    }
    std::memcpy(&tid, bytes_.data(), sizeof tid);
    std::memcpy(&count, bytes_.data() + 8, sizeof count);
    sink_.lost(tid, count);
    total += count;
    return {};
  }

  Status thread(std::uint32_t size, std::uint64_t at) {
    if (Status st = read_payload(size, at); !st.ok()) return st;
    std::uint32_t tid, length;
    if (bytes_.size() < 8) {
      damaged("thread", at, "it is too small; skipped");
      return {};
    }
    std::memcpy(&tid, bytes_.data(), sizeof tid);
    std::memcpy(&length, bytes_.data() + 4, sizeof length);
    if (length > bytes_.size() - 8) {
      damaged("thread", at, "its name runs past the chunk; skipped");
      return {};
    }
    sink_.thread_name(tid, std::string_view(bytes_.data() + 8, length));
    return {};
  }

  Status end(std::uint32_t size, std::uint64_t at, std::uint64_t& end_lost) {
    if (Status st = read_payload(size, at); !st.ok()) return st;
    s_.closed_cleanly = true;
    if (bytes_.size() < 16) {
      damaged("end", at, "it is too small; its totals were not checked");
      return {};
    }
    std::uint64_t events;
    std::memcpy(&events, bytes_.data(), sizeof events);
    std::memcpy(&end_lost, bytes_.data() + 8, sizeof end_lost);
    if (events != s_.events)
      warn("trace file " + s_.path + " holds " + std::to_string(s_.events) + " events but its end chunk counts " +
           std::to_string(events) + "; the file may be damaged");
    return {};
  }

  Status read_payload(std::uint32_t size, std::uint64_t at) {
    bytes_.resize(size);
    return read_exact(bytes_.data(), size, at);
  }
  Status read_exact(void* to, std::uint64_t size, std::uint64_t at) {
    if (std::fread(to, 1, size, f_) == size) return {};
    if (std::ferror(f_)) return read_error();
    // The size was checked against fstat: the file shrank while we read it.
    return Status::error("trace file " + s_.path + " ended at byte " + std::to_string(at) +
                         " while being read: is the recorder still writing it? wait for it to finish");
  }
  Status skip(std::uint64_t size) {
    if (fseeko(f_, static_cast<off_t>(size), SEEK_CUR) != 0) return read_error();
    return {};
  }
  Status read_error() const {
    const int e = errno;
    return Status::error("cannot read trace file " + s_.path + ": " + errno_text(e), e);
  }
  void damaged(const char* kind, std::uint64_t at, const std::string& what) {
    warn("trace file " + s_.path + " has a damaged " + kind + " chunk at byte " +
         std::to_string(at - sizeof(ChunkHeader)) + ": " + what);
  }
  void warn(std::string message) {
    if (options_.diagnostics) std::fprintf(options_.diagnostics, "warning: %s\n", message.c_str());
    s_.warnings.push_back(std::move(message));
  }

  std::FILE* f_;
  TraceSink& sink_;
  const ReadOptions& options_;
  ReadSummary& s_;
  std::vector<char> bytes_;     // payload of the current chunk
  std::vector<Event> events_;   // events of the current chunk (aligned for the sink's span)
};

}  // namespace

Result<ReadSummary> read_trace(const std::string& path, TraceSink& sink, const ReadOptions& options) {
  ReadSummary summary;
  summary.path = path;
  // Non-blocking, so that opening a FIFO does not wait for a writer: it is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    return Status::error("cannot open trace file " + path + ": " + errno_text(e) +
                             (e == ENOENT ? " (record one with `tramway record`)" : ""),
                         e);
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    return Status::error("cannot read trace file " + path + ": " + errno_text(e), e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::error(path + " is " + file_kind(st.st_mode) +
                         ", not a regular file: pass a trace file written by `tramway record` (to read a "
                         "pipe, save it to a file first)");
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  std::FILE* f = ::fdopen(fd, "rb");
  if (!f) {
    const int e = errno;
    ::close(fd);
    return Status::error("cannot read trace file " + path + ": " + errno_text(e), e);
  }
  // Chunks are read with small freads; a large buffer keeps that to few system calls.
  std::vector<char> buffer(1 << 20);
  std::setvbuf(f, buffer.data(), _IOFBF, buffer.size());
  summary.file_bytes = static_cast<std::uint64_t>(st.st_size);
  const Status status = Reader(f, sink, options, summary).read();
  std::fclose(f);
  if (!status.ok()) return status;
  return summary;
}

}  // namespace tramway::trace::report
