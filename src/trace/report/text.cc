// Shared helpers of the report outputs (internal.h): UTF-8, escaping, and the
// calling-context tree merged by name.
#include <algorithm>
#include <cstdio>

#include "trace/report/internal.h"

namespace tramway::trace::report::detail {
namespace {

bool continuation(unsigned char c) { return (c & 0xC0) == 0x80; }

// Length of the well-formed UTF-8 sequence at s[i] (RFC 3629: no overlongs, no surrogates,
// nothing above U+10FFFF), or 0.
std::size_t sequence_length(std::string_view s, std::size_t i) {
  const auto at = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = at(0);
  if (c < 0x80) return 1;
  std::size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (s.size() - i < n) return 0;
  if (at(1) < lo || at(1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k)
    if (!continuation(at(k))) return 0;
  return n;
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace

std::string valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = sequence_length(s, i);
    if (n == 0) {
      out += kReplacement;
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

std::size_t display_width(std::string_view s) {
  return static_cast<std::size_t>(
      std::count_if(s.begin(), s.end(), [](char c) { return !continuation(static_cast<unsigned char>(c)); }));
}

std::string_view first_code_points(std::string_view s, std::size_t n) {
  std::size_t i = 0;
  for (std::size_t seen = 0; i < s.size(); ++i) {
    if (!continuation(static_cast<unsigned char>(s[i])) && seen++ == n) break;
  }
  return s.substr(0, i);
}

std::string json_escape(std::string_view raw) {
  const std::string s = valid_utf8(raw);
  std::string out;
  out.reserve(s.size());
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out;
}

std::string xml_escape(std::string_view raw) {
  const std::string s = valid_utf8(raw);
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') break;  // not allowed in XML 1.0
        // U+FFFE and U+FFFF are not XML characters either.
        if (c == 0xEF && i + 2 < s.size() && static_cast<unsigned char>(s[i + 1]) == 0xBF &&
            static_cast<unsigned char>(s[i + 2]) >= 0xBE) {
          out += kReplacement;
          i += 2;
          break;
        }
        out += s[i];
    }
  }
  return out;
}

std::string aligned_table(const std::vector<std::string>& heads, const std::vector<std::vector<std::string>>& rows,
                          const std::vector<std::string>& names) {
  std::vector<std::size_t> width(heads.size());
  for (std::size_t c = 0; c < heads.size(); ++c) width[c] = display_width(heads[c]);
  for (const auto& row : rows)
    for (std::size_t c = 0; c < heads.size(); ++c) width[c] = std::max(width[c], display_width(row[c]));
  // Appended piecewise: GCC 12 -O3 warns (-Wrestrict, wrongly) on "literal" + string.
  std::string out;
  const auto line = [&](const std::vector<std::string>& fields, std::string_view name) {
    for (std::size_t c = 0; c < heads.size(); ++c) {
      const std::size_t w = display_width(fields[c]);
      if (w < width[c]) out.append(width[c] - w, ' ');
      out += fields[c];
      out += "  ";
    }
    out += name;
    out += '\n';
  };
  line(heads, "function");
  for (std::size_t i = 0; i < rows.size(); ++i) line(rows[i], valid_utf8(names[i]));
  return out;
}

std::string shown_note(std::size_t shown, std::size_t total) {
  if (shown >= total) return {};
  std::string out = "(";
  out += std::to_string(shown);
  out += " of ";
  out += std::to_string(total);
  out += " functions shown; a limit of 0 shows all)\n";
  return out;
}

std::string thread_label(const ThreadProfile& thread) {
  std::string s = std::to_string(thread.tid);
  if (!thread.name.empty()) s += " (" + thread.name + ")";
  return s;
}

NameTree merge_by_name(const Profile& profile, bool per_thread) {
  NameTree merged;
  merged.nodes.push_back({"all", 0, 0, 0, {}});
  const auto child = [&](std::uint32_t parent, const std::string& name) {
    const auto next = static_cast<std::uint32_t>(merged.nodes.size());
    const auto [it, added] = merged.nodes[parent].children.try_emplace(name, next);
    const std::uint32_t index = it->second;  // read before push_back moves the maps
    if (added) merged.nodes.push_back({name, 0, 0, 0, {}});
    return index;
  };
  for (const ThreadProfile& t : profile.threads) {
    if (t.tree.size() <= 1) continue;
    const std::uint32_t top = per_thread ? child(0, "thread " + thread_label(t)) : 0;
    // Iterative walk: recursion in the traced program can make the tree very deep.
    std::vector<std::pair<std::uint32_t, std::uint32_t>> todo;  // (thread node, merged parent)
    for (auto it = t.tree[0].children.rbegin(); it != t.tree[0].children.rend(); ++it) todo.emplace_back(*it, top);
    while (!todo.empty()) {
      const auto [index, parent] = todo.back();
      todo.pop_back();
      const CallNode& node = t.tree[index];
      const std::uint32_t m = child(parent, profile.functions[node.function].name);
      merged.nodes[m].calls += node.calls;
      merged.nodes[m].total_ns += node.total_ns;
      merged.nodes[m].self_ns += node.self_ns;
      for (const std::uint32_t c : node.children) todo.emplace_back(c, m);
    }
    if (per_thread) {
      for (const auto& [name, c] : merged.nodes[top].children) merged.nodes[top].total_ns += merged.nodes[c].total_ns;
    }
  }
  for (const auto& [name, c] : merged.nodes[0].children) merged.nodes[0].total_ns += merged.nodes[c].total_ns;
  return merged;
}

}  // namespace tramway::trace::report::detail
