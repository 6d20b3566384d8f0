// Flame graphs: folded stacks for flamegraph.pl / speedscope / inferno, and an SVG that
// tramway draws itself. Both come from the calling-context tree merged by name across threads
// (internal.h), so one stack of functions is one line or one rectangle however many threads
// and calls went through it.
#include <cerrno>
#include <cinttypes>
#include <cstring>

#include "trace/report/internal.h"

namespace tramway::trace::report {
namespace {

Status write_failed(const char* what) {
  const int e = errno;
  return Status::error(std::string("writing the ") + what + " failed: " + std::strerror(e), e);
}

Status finish_write(std::FILE* out, const char* what) {
  if (std::fflush(out) != 0 || std::ferror(out)) return write_failed(what);
  return {};
}

// A frame in a folded line: ';' separates frames and a line ends the stack.
std::string folded_frame(std::string_view name) {
  std::string s = detail::valid_utf8(name);
  for (char& c : s) {
    if (c == ';') c = ':';
    else if (c == '\n' || c == '\r') c = ' ';
  }
  return s;
}

// ---- SVG ----

constexpr double kFrameHeight = 16;
constexpr double kFontSize = 12;
constexpr double kCharWidth = kFontSize * 0.59;  // average glyph of Verdana-like fonts
constexpr double kTextPad = 3;
constexpr double kSidePad = 10;
constexpr double kTop = 40;     // room for the title
constexpr double kBottom = 28;  // room for the details line

struct Placed {
  std::uint32_t node;
  std::uint32_t depth;
  double x, width;
};

// FNV-1a: a name keeps its colour between runs and files.
std::uint32_t name_hash(std::string_view s) {
  std::uint32_t h = 2166136261u;
  for (const char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 16777619u;
  }
  return h;
}

// The "hot" palette of flame graphs: red to yellow, a little blue.
std::string colour(std::string_view name) {
  const std::uint32_t h = name_hash(name);
  char buf[32];
  std::snprintf(buf, sizeof buf, "rgb(%u,%u,%u)", 205 + h % 51, (h >> 8) % 231, (h >> 20) % 56);
  return buf;
}

// The label that fits `width` pixels: the whole name, a prefix and "..", or nothing.
std::string fitted_label(std::string_view name, double width) {
  const double room = (width - 2 * kTextPad) / kCharWidth;
  if (room < 3) return {};
  const auto chars = static_cast<std::size_t>(room);
  if (detail::display_width(name) <= chars) return std::string(name);
  return std::string(detail::first_code_points(name, chars - 2)) + "..";
}

// Click a frame to zoom into it (its ancestors stretch to the full width, unrelated frames
// hide); click the background or "Reset zoom" to go back. Labels are re-fitted like
// fitted_label() does.
constexpr const char* kZoomScript = R"JS(
var frames = [], pad = 0, full = 0;
function fit(name, w) {
  var room = Math.floor((w - 2 * %TEXTPAD%) / %CHARW%);
  if (room < 3) return "";
  return name.length <= room ? name : name.slice(0, room - 2) + "..";
}
function place(f, x, w) {
  f.rect.setAttribute("x", x.toFixed(2));
  f.rect.setAttribute("width", w.toFixed(2));
  f.text.setAttribute("x", (x + %TEXTPAD%).toFixed(2));
  f.text.textContent = fit(f.name, w);
}
function zoom(z) {
  var eps = 1e-6, scale = full / z.w;
  document.getElementById("reset").style.display = "";
  frames.forEach(function (f) {
    var inside = f.d >= z.d && f.x >= z.x - eps && f.x + f.w <= z.x + z.w + eps;
    var above = f.d < z.d && f.x <= z.x + eps && f.x + f.w >= z.x + z.w - eps;
    f.g.style.display = inside || above ? "" : "none";
    f.g.style.opacity = above ? "0.6" : "";
    if (inside) place(f, pad + (f.x - z.x) * scale, f.w * scale);
    else if (above) place(f, pad, full);
  });
}
function unzoom() {
  document.getElementById("reset").style.display = "none";
  frames.forEach(function (f) {
    f.g.style.display = "";
    f.g.style.opacity = "";
    place(f, f.x, f.w);
  });
}
window.addEventListener("load", function () {
  pad = %SIDEPAD%;
  full = +document.documentElement.getAttribute("width") - 2 * pad;
  document.querySelectorAll("g.f").forEach(function (g) {
    var r = g.querySelector("rect");
    var f = {g: g, rect: r, text: g.querySelector("text"), name: g.getAttribute("data-n"),
             d: +g.getAttribute("data-d"), x: +r.getAttribute("x"), w: +r.getAttribute("width")};
    frames.push(f);
    g.addEventListener("click", function (e) { e.stopPropagation(); zoom(f); });
  });
  document.getElementById("background").addEventListener("click", unzoom);
  document.getElementById("reset").addEventListener("click", unzoom);
});
)JS";

std::string zoom_script() {
  std::string s = kZoomScript;
  const auto number = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    return std::string(buf);
  };
  const std::pair<std::string, std::string> substitutions[] = {
      {"%TEXTPAD%", number(kTextPad)}, {"%CHARW%", number(kCharWidth)}, {"%SIDEPAD%", number(kSidePad)}};
  for (const auto& [from, to] : substitutions)
    for (std::size_t at; (at = s.find(from)) != std::string::npos;) s.replace(at, from.size(), to);
  return s;
}

}  // namespace

// Each line is one distinct stack, root first, and its value is the SELF time (ns) of the
// innermost frame on that stack. flamegraph.pl and speedscope add a stack's value to every
// frame on it, so a frame's width comes out as its total time, and the values add up to the
// total self time of the trace (= the time of the outermost frames) with nothing counted twice.
Status write_folded(const Profile& profile, std::FILE* out, bool per_thread) {
  const detail::NameTree tree = detail::merge_by_name(profile, per_thread);
  const std::uint64_t budget = folded_budget(profile.source.file_bytes);
  std::uint64_t written = 0;
  std::string path;
  std::vector<std::pair<std::uint32_t, std::size_t>> todo;  // (node, length of its parent's path)
  for (auto it = tree.nodes[0].children.rbegin(); it != tree.nodes[0].children.rend(); ++it)
    todo.emplace_back(it->second, 0);
  while (!todo.empty()) {
    const auto [index, prefix] = todo.back();
    todo.pop_back();
    const detail::NameNode& node = tree.nodes[index];
    path.resize(prefix);
    if (prefix > 0) path += ';';
    path += folded_frame(node.name);
    if (node.self_ns > 0) {
      char value[32];
      const int value_bytes = std::snprintf(value, sizeof value, " %" PRIu64 "\n", node.self_ns);
      written += path.size() + static_cast<std::uint64_t>(value_bytes);
      if (written > budget) {
        std::fflush(out);
        return Status::error("the folded stacks would outgrow " + std::to_string(budget >> 20) +
                             " MiB (64 times the trace file, at least 64 MiB) and were cut there: each line names "
                             "every frame of its stack, and this trace has many distinct deep stacks; a smaller "
                             "--max-depth (default 512) shortens the lines");
      }
      std::fputs(path.c_str(), out);
      std::fputs(value, out);
    }
    for (auto it = node.children.rbegin(); it != node.children.rend(); ++it) todo.emplace_back(it->second, path.size());
  }
  return finish_write(out, "folded stacks");
}

Status write_svg(const Profile& profile, std::FILE* out, const SvgOptions& options) {
  const detail::NameTree tree = detail::merge_by_name(profile, false);
  const std::uint64_t total = tree.nodes[0].total_ns;
  const double width = std::max(100.0, static_cast<double>(options.width));
  const double usable = width - 2 * kSidePad;

  // Place frames: children left to right in name order inside their parent, as wide as their
  // share of the total time; narrower than min_frame_width, a frame and its subtree are left out.
  std::vector<Placed> placed;
  std::uint32_t max_depth = 0;
  if (total > 0) {
    std::vector<Placed> todo{{0, 0, kSidePad, usable}};
    while (!todo.empty()) {
      const Placed p = todo.back();
      todo.pop_back();
      placed.push_back(p);
      max_depth = std::max(max_depth, p.depth);
      double x = p.x;
      const double end = p.x + p.width;
      for (const auto& [name, c] : tree.nodes[p.node].children) {
        // A child cannot outgrow its parent; clamp in case a damaged file's times say otherwise.
        const double share = static_cast<double>(tree.nodes[c].total_ns) / static_cast<double>(total);
        const double w = std::min(usable * share, end - x);
        if (w >= options.min_frame_width) todo.push_back({c, p.depth + 1, x, w});
        x += std::max(w, 0.0);
      }
    }
  }
  const double height = kTop + (max_depth + 1) * kFrameHeight + kBottom;

  std::fprintf(out,
               "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%.0f\" height=\"%.0f\" "
               "viewBox=\"0 0 %.0f %.0f\">\n",
               width, height, width, height);
  std::fputs(
      "<style>\n"
      "text { font-family: Verdana, sans-serif; font-size: 12px; fill: #000; }\n"
      ".f { cursor: pointer; }\n"
      ".f text { pointer-events: none; }\n"
      ".f:hover rect { stroke: #000; stroke-width: 0.5; }\n"
      "#reset { cursor: pointer; }\n"
      "</style>\n"
      "<defs><linearGradient id=\"bg\" x1=\"0\" y1=\"0\" x2=\"0\" y2=\"1\">"
      "<stop stop-color=\"#eeeeee\" offset=\"5%\"/><stop stop-color=\"#eeeeb0\" offset=\"95%\"/>"
      "</linearGradient></defs>\n",
      out);
  std::fprintf(out, "<rect id=\"background\" x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" fill=\"url(#bg)\"/>\n",
               width, height);
  std::fprintf(out, "<text x=\"%.1f\" y=\"24\" text-anchor=\"middle\" style=\"font-size:17px\">%s</text>\n",
               width / 2, detail::xml_escape(options.title).c_str());
  std::fprintf(out, "<text id=\"reset\" x=\"%.1f\" y=\"24\" style=\"display:none\">Reset zoom</text>\n", kSidePad);

  const std::string details =
      profile.source.path + ": " + std::to_string(profile.threads.size()) + " threads, " +
      std::to_string(profile.events) + " events, " + format_duration(total) + " in traced calls" +
      (profile.lost > 0 ? ", " + std::to_string(profile.lost) + " events lost (rings full)" : "") +
      (total > 0 ? "; click a frame to zoom" : "; no completed calls to draw");
  std::fprintf(out, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", kSidePad, height - 10,
               detail::xml_escape(details).c_str());

  for (const Placed& p : placed) {
    const detail::NameNode& node = tree.nodes[p.node];
    const double y = kTop + (max_depth - p.depth) * kFrameHeight;
    const double share = 100.0 * static_cast<double>(node.total_ns) / static_cast<double>(total);
    const std::string name = detail::xml_escape(node.name);
    std::string tip = node.name + " (" + format_duration(node.total_ns);
    char pct[32];
    std::snprintf(pct, sizeof pct, ", %.2f%%", share);
    tip += pct;
    if (p.node != 0) tip += ", " + std::to_string(node.calls) + (node.calls == 1 ? " call" : " calls");
    tip += ")";
    const std::string label = detail::xml_escape(fitted_label(detail::valid_utf8(node.name), p.width));
    std::fprintf(out,
                 "<g class=\"f\" data-d=\"%u\" data-n=\"%s\"><title>%s</title>"
                 "<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.1f\" rx=\"2\" fill=\"%s\"/>"
                 "<text x=\"%.2f\" y=\"%.1f\">%s</text></g>\n",
                 p.depth, name.c_str(), detail::xml_escape(tip).c_str(), p.x, y, p.width, kFrameHeight - 1,
                 colour(node.name).c_str(), p.x + kTextPad, y + kFrameHeight - 4.5, label.c_str());
  }
  std::fprintf(out, "<script><![CDATA[%s]]></script>\n</svg>\n", zoom_script().c_str());
  return finish_write(out, "SVG flame graph");
}

}  // namespace tramway::trace::report
