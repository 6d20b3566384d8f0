// trace/report internals shared by the output writers: text escaping for JSON and XML,
// UTF-8 handling (symbol names are bytes; JSON and XML readers reject invalid UTF-8), and the
// calling-context tree merged by function name across threads (folded stacks, SVG).
// Guarantees: every escaped string is valid UTF-8 without raw control characters.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "trace/report/report.h"

namespace tramway::trace::report::detail {

// Copies `s`, replacing each byte that does not start a well-formed UTF-8 sequence by U+FFFD.
std::string valid_utf8(std::string_view s);

// Number of code points of a valid UTF-8 string (what a monospace column counts).
std::size_t display_width(std::string_view s);

// The first `n` code points of a valid UTF-8 string.
std::string_view first_code_points(std::string_view s, std::size_t n);

// Contents of a JSON string literal (without the quotes).
std::string json_escape(std::string_view s);

// Text or attribute content for XML: & < > " ' escaped, control characters dropped.
std::string xml_escape(std::string_view s);


// The text tables (the report's, the diff's): a header line, then a line a row, each cell
// right-aligned to its column's widest (display width), two spaces apart, the function's name
// last, unaligned. Every row has as many cells as `heads`.
std::string aligned_table(const std::vector<std::string>& heads, const std::vector<std::vector<std::string>>& rows,
                          const std::vector<std::string>& names);
// "(N of M functions shown; a limit of 0 shows all)\n" when rows were cut, else "".
std::string shown_note(std::size_t shown, std::size_t total);

// "1234 (worker-3)" or "1234": how outputs name a thread.
std::string thread_label(const ThreadProfile& thread);

// Calling-context tree over function names: stacks that print the same are one node.
struct NameNode {
  std::string name;
  std::uint64_t calls = 0, total_ns = 0, self_ns = 0;
  std::map<std::string, std::uint32_t> children;  // by name: deterministic order
};
struct NameTree {
  std::vector<NameNode> nodes;  // nodes[0] is the root ("all"); its total is its children's
};
// With `per_thread`, the root's children are one node per thread ("thread 1234 (name)").
NameTree merge_by_name(const Profile& profile, bool per_thread);

}  // namespace tramway::trace::report::detail
