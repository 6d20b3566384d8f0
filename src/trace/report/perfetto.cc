// Perfetto's native trace format (TrackEvent protobuf; perfetto_trace.proto lists the fields
// written), streamed: a sink re-reads the trace file and writes each event as it comes, so
// memory is the open frames and interned names of each thread, whatever the file's size.
//
// One packet sequence a thread: its first packet clears the incremental state, sets the
// sequence's defaults (the thread's track, clock 64) and snapshots clock 64 as incremental
// from 0 = BOOTTIME 0, so every later timestamp is the delta from the sequence's previous
// packet (a byte or two). Function names are interned per sequence on first use. Frames are
// matched as ProfileBuilder matches them (an exit closes the innermost open frame of its
// function and the frames above it; an exit with none open is dropped; frames open at the end
// close at the thread's last timestamp), so every slice begun ends. Lost events are instants.
//
// Encoded by hand rather than with libprotobuf: each event is a dozen bytes of varints
// written into one buffer, with no message objects to build (see the issue note for the
// measured difference).
#include <algorithm>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "trace/report/call_filter.h"
#include "trace/report/internal.h"
#include "trace/report/protobuf_wire.h"

namespace tramway::trace::report {
namespace {

using format::Event;
using format::EventKind;

// Field numbers (perfetto_trace.proto).
enum : std::uint32_t {
  kTracePacket = 1,
  kTimestamp = 8,
  kSequenceId = 10,
  kTrackEvent = 11,
  kInternedData = 12,
  kSequenceFlags = 13,
  kClockSnapshot = 6,
  kPacketDefaults = 59,
  kTrackDescriptor = 60,
  kDefaultsClockId = 58,
  kDefaultsTrackEvent = 11,
  kEventDefaultsTrackUuid = 11,
  kSnapshotClocks = 1,
  kClockId = 1,
  kClockTimestamp = 2,
  kClockIncremental = 3,
  kInternedEventNames = 2,
  kEventNameIid = 1,
  kEventNameName = 2,
  kEventType = 9,
  kEventNameIidField = 10,
  kEventName = 23,
  kEventAnnotations = 4,
  kAnnotationName = 10,
  kAnnotationUint = 3,
  kDescriptorUuid = 1,
  kDescriptorParent = 5,
  kDescriptorProcess = 3,
  kDescriptorThread = 4,
  kProcessPid = 1,
  kProcessName = 6,
  kThreadPid = 1,
  kThreadTid = 2,
  kThreadName = 5,
};
enum : std::uint64_t { kSliceBegin = 1, kSliceEnd = 2, kInstant = 3 };
enum : std::uint64_t { kStateCleared = 1, kNeedsState = 2 };
constexpr std::uint64_t kIncrementalClock = 64, kBoottime = 6;

struct Sequence {
  std::uint32_t id = 0;
  std::uint64_t last_ns = 0;  // the sequence's previous timestamp (clock 64 is incremental)
  std::unordered_map<std::uint64_t, std::uint64_t> iids;  // function address -> interned id
  std::vector<std::uint64_t> open;  // functions of the open frames, innermost last
};

class PerfettoSink final : public TraceSink {
 public:
  PerfettoSink(const Profile& profile, std::FILE* out) : file_(out) {
    for (const FunctionInfo& f : profile.functions) names_.emplace(f.address, &f.name);
    for (const ThreadProfile& t : profile.threads) thread_names_.emplace(t.tid, &t.name);
    pid_ = static_cast<std::uint32_t>(profile.source.header.pid);
    detail::ProtoWriter& p = packet();
    p.uint(kSequenceId, 1);  // the process track, on a sequence of its own
    const std::size_t d = p.begin(kTrackDescriptor);
    p.uint(kDescriptorUuid, process_uuid());
    const std::size_t proc = p.begin(kDescriptorProcess);
    p.uint(kProcessPid, pid_);
    p.string(kProcessName, "pid " + std::to_string(pid_));
    p.end(proc);
    p.end(d);
    finish_packet();
  }

  void function(std::uint64_t, std::string_view) override {}  // names come from the profile
  void thread_name(std::uint32_t, std::string_view) override {}

  void events(std::uint32_t tid, std::span<const Event> events) override {
    Sequence& s = sequence(tid);
    for (const Event& e : events) {
      switch (e.kind()) {
        case EventKind::entry:
          slice_begin(s, e.time_ns, e.address());
          s.open.push_back(e.address());
          break;
        case EventKind::exit:
        case EventKind::unwound: {
          const auto it = std::find(s.open.rbegin(), s.open.rend(), e.address());
          if (it == s.open.rend()) break;  // no open frame of it: dropped, as the table drops it
          const std::size_t keep = static_cast<std::size_t>(s.open.rend() - it) - 1;
          while (s.open.size() > keep) {
            slice_end(s, e.time_ns);
            s.open.pop_back();
          }
          break;
        }
        default: break;  // unknown kinds are counted by the table's footnote
      }
    }
  }

  void lost(std::uint32_t tid, std::uint64_t count) override {
    Sequence& s = sequence(tid);
    detail::ProtoWriter& p = event_packet(s, s.last_ns);
    const std::size_t te = p.begin(kTrackEvent);
    p.uint(kEventType, kInstant);
    p.string(kEventName, "lost events");
    const std::size_t a = p.begin(kEventAnnotations);
    p.string(kAnnotationName, "count");
    p.uint(kAnnotationUint, count);
    p.end(a);
    p.end(te);
    finish_packet();
  }

  // Closes every frame still open at its thread's last timestamp; flushes.
  Status finish() {
    for (auto& [tid, s] : sequences_) {
      while (!s.open.empty()) {
        slice_end(s, s.last_ns);
        s.open.pop_back();
      }
    }
    flush();
    return status_;
  }

 private:
  std::FILE* file_;
  std::uint32_t pid_ = 0;
  std::unordered_map<std::uint64_t, const std::string*> names_;
  std::unordered_map<std::uint32_t, const std::string*> thread_names_;
  std::unordered_map<std::uint32_t, Sequence> sequences_;
  std::uint32_t next_sequence_ = 2;
  detail::ProtoWriter buffer_;  // packets are written straight into the output buffer
  std::size_t packet_start_ = 0;
  Status status_;

  std::uint64_t process_uuid() const { return std::uint64_t{1} << 63 | pid_; }
  std::uint64_t thread_uuid(std::uint32_t tid) const { return std::uint64_t{pid_} << 32 | tid | 1ull << 62; }

  // A packet is Trace.packet (field 1), its length patched in by finish_packet.
  detail::ProtoWriter& packet() {
    packet_start_ = buffer_.begin(kTracePacket);
    return buffer_;
  }
  void finish_packet() {
    buffer_.end(packet_start_);
    if (buffer_.bytes.size() >= (1u << 20)) flush();
  }
  void flush() {
    if (status_.ok() && !buffer_.bytes.empty() &&
        std::fwrite(buffer_.bytes.data(), 1, buffer_.bytes.size(), file_) != buffer_.bytes.size()) {
      status_ = Status::error(std::string("writing the Perfetto trace: ") + std::strerror(errno), errno);
    }
    buffer_.bytes.clear();
  }

  Sequence& sequence(std::uint32_t tid) {
    auto [it, fresh] = sequences_.try_emplace(tid);
    Sequence& s = it->second;
    if (!fresh) return s;
    s.id = next_sequence_++;
    detail::ProtoWriter& p = packet();
    p.uint(kSequenceId, s.id);
    p.uint(kSequenceFlags, kStateCleared);
    const std::size_t snap = p.begin(kClockSnapshot);
    for (const auto& [clock, incremental] : {std::pair{kIncrementalClock, true}, std::pair{kBoottime, false}}) {
      const std::size_t c = p.begin(kSnapshotClocks);
      p.uint(kClockId, clock);
      p.uint(kClockTimestamp, 0);
      if (incremental) p.uint(kClockIncremental, 1);
      p.end(c);
    }
    p.end(snap);
    const std::size_t defaults = p.begin(kPacketDefaults);
    p.uint(kDefaultsClockId, kIncrementalClock);
    const std::size_t ted = p.begin(kDefaultsTrackEvent);
    p.uint(kEventDefaultsTrackUuid, thread_uuid(tid));
    p.end(ted);
    p.end(defaults);
    finish_packet();

    detail::ProtoWriter& d = packet();
    d.uint(kSequenceId, s.id);
    const std::size_t td = d.begin(kTrackDescriptor);
    d.uint(kDescriptorUuid, thread_uuid(tid));
    d.uint(kDescriptorParent, process_uuid());
    const std::size_t th = d.begin(kDescriptorThread);
    d.uint(kThreadPid, pid_);
    d.uint(kThreadTid, tid);
    const auto name = thread_names_.find(tid);
    d.string(kThreadName, name != thread_names_.end() && !name->second->empty() ? *name->second
                                                                                  : "thread " + std::to_string(tid));
    d.end(th);
    d.end(td);
    finish_packet();
    return s;
  }

  detail::ProtoWriter& event_packet(Sequence& s, std::uint64_t time_ns) {
    detail::ProtoWriter& p = packet();
    const std::uint64_t t = std::max(time_ns, s.last_ns);  // in order per thread; never negative
    p.uint(kTimestamp, t - s.last_ns);
    s.last_ns = t;
    p.uint(kSequenceId, s.id);
    p.uint(kSequenceFlags, kNeedsState);
    return p;
  }

  void slice_begin(Sequence& s, std::uint64_t time_ns, std::uint64_t function) {
    auto [it, fresh] = s.iids.try_emplace(function, s.iids.size() + 1);
    detail::ProtoWriter& p = event_packet(s, time_ns);
    if (fresh) {
      const std::size_t interned = p.begin(kInternedData);
      const std::size_t en = p.begin(kInternedEventNames);
      p.uint(kEventNameIid, it->second);
      const auto name = names_.find(function);
      p.string(kEventNameName, name != names_.end() ? detail::valid_utf8(*name->second) : common_hex(function));
      p.end(en);
      p.end(interned);
    }
    const std::size_t te = p.begin(kTrackEvent);
    p.uint(kEventType, kSliceBegin);
    p.uint(kEventNameIidField, it->second);
    p.end(te);
    finish_packet();
  }

  void slice_end(Sequence& s, std::uint64_t time_ns) {
    detail::ProtoWriter& p = event_packet(s, time_ns);
    const std::size_t te = p.begin(kTrackEvent);
    p.uint(kEventType, kSliceEnd);
    p.end(te);
    finish_packet();
  }

  static std::string common_hex(std::uint64_t address) {
    char buf[24];
    std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(address));
    return buf;
  }
};

}  // namespace

Status write_perfetto(const Profile& profile, std::FILE* out) {
  PerfettoSink sink(profile, out);
  if (Status s = read_again(profile, sink); !s.ok()) return s;  // the calls the profile kept
  return sink.finish();
}

}  // namespace tramway::trace::report
