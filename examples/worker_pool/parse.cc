// parse — lines of ';'-separated key=value fields into records. A line is rejected if a field
// is malformed, unknown or repeated, or a required one is missing; '#' lines are comments.
#include <iterator>

#include "worker_pool.h"

namespace parse {

enum Field : unsigned { kId = 1, kUser = 2, kOp = 4, kBytes = 8, kLatency = 16, kTags = 32 };
constexpr unsigned kRequired = kId | kUser | kOp | kBytes | kLatency;

WP_NOINLINE Block parse_block(std::string_view text) {
  Block block;
  block.records.reserve(text.size() / 64);
  while (!text.empty()) {
    const std::size_t newline = text.find('\n');
    const std::string_view line = text.substr(0, newline);
    text.remove_prefix(newline == std::string_view::npos ? text.size() : newline + 1);
    if (line.empty() || line.front() == '#') continue;
    Record record;
    if (parse_record(line, record)) {
      block.records.push_back(record);
    } else {
      ++block.rejected;
    }
  }
  return block;
}

WP_NOINLINE bool parse_record(std::string_view line, Record& out) {
  out = {};
  unsigned seen = 0;
  for (;;) {
    const std::size_t semicolon = line.find(';');
    if (!parse_field(line.substr(0, semicolon), out, seen)) return false;
    if (semicolon == std::string_view::npos) break;
    line.remove_prefix(semicolon + 1);
  }
  return (seen & kRequired) == kRequired;
}

WP_NOINLINE bool parse_field(std::string_view field, Record& out, unsigned& seen) {
  const std::size_t equals = field.find('=');
  if (equals == std::string_view::npos) return false;
  const std::string_view key = field.substr(0, equals);
  const std::string_view value = field.substr(equals + 1);
  Field which;
  bool ok;
  if (key == "id") {
    which = kId;
    ok = parse_number(value, out.id);
  } else if (key == "user") {
    which = kUser;
    ok = parse_user(value, out.user);
  } else if (key == "op") {
    which = kOp;
    ok = parse_op(value, out.op);
  } else if (key == "bytes") {
    which = kBytes;
    ok = parse_number(value, out.bytes);
  } else if (key == "latency_us") {
    which = kLatency;
    ok = parse_number(value, out.latency_us);
  } else if (key == "tags") {
    which = kTags;
    ok = parse_tags(value, out.tags);
  } else {
    return false;
  }
  if (!ok || (seen & which)) return false;
  seen |= which;
  return true;
}

// Decimal digits only, at most 19 (always fits 64 bits).
WP_NOINLINE bool parse_number(std::string_view text, std::uint64_t& out) {
  if (text.empty() || text.size() > 19) return false;
  std::uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<std::uint64_t>(c - '0');
  }
  out = value;
  return true;
}

WP_NOINLINE bool parse_user(std::string_view text, std::uint64_t& out) {
  return text.size() > 1 && text.front() == 'u' && parse_number(text.substr(1), out);
}

WP_NOINLINE bool parse_op(std::string_view text, Op& out) {
  for (std::size_t i = 0; i < std::size(kOpNames); ++i) {
    if (text == kOpNames[i]) {
      out = static_cast<Op>(i);
      return true;
    }
  }
  return false;
}

WP_NOINLINE int parse_tag(std::string_view text) {
  for (std::size_t i = 0; i < std::size(kTagNames); ++i)
    if (text == kTagNames[i]) return static_cast<int>(i);
  return -1;
}

// '|'-separated tags, at least one.
WP_NOINLINE bool parse_tags(std::string_view text, std::uint32_t& out) {
  std::uint32_t mask = 0;
  for (;;) {
    const std::size_t bar = text.find('|');
    const int tag = parse_tag(text.substr(0, bar));
    if (tag < 0) return false;
    mask |= 1u << tag;
    if (bar == std::string_view::npos) break;
    text.remove_prefix(bar + 1);
  }
  out = mask;
  return true;
}

}  // namespace parse
