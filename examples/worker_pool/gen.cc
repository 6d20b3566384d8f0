// gen — each job's input: lines of key=value records from a seeded PRNG, so that a job's
// bytes depend on (seed, round, job) alone. Users, ops and tags come from small, skewed
// vocabularies, which gives the compressor repetitions to find.
#include <algorithm>
#include <charconv>
#include <iterator>

#include "worker_pool.h"

namespace gen {

WP_NOINLINE std::uint64_t next_random(Rng& rng) {
  std::uint64_t z = (rng.state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

WP_NOINLINE std::uint64_t job_seed(std::uint64_t seed, std::uint64_t round, std::uint64_t job) {
  Rng rng{seed};
  rng.state ^= next_random(rng) + round * 0xd1b54a32d192ed03ull;
  rng.state ^= next_random(rng) + job * 0xaef17502108ef2d9ull;
  return next_random(rng);
}

WP_NOINLINE void append_number(std::uint64_t value, std::string& out) {
  char buf[20];
  const auto end = std::to_chars(buf, buf + sizeof buf, value).ptr;
  out.append(buf, end);
}

// One line. About 1 in 64 is a comment and 1 in 64 malformed (an unknown op, a non-digit in a
// number, or a field without '='), so that the parser's error paths run too.
WP_NOINLINE void append_record(Rng& rng, std::uint64_t id, std::string& out) {
  const std::uint32_t kind = next_below(rng, 64);
  if (kind == 0) {
    out += "# checkpoint ";
    append_number(id, out);
    out += '\n';
    return;
  }
  const std::uint32_t defect = kind == 1 ? 1 + next_below(rng, 3) : 0;
  out += "id=";
  append_number(id, out);
  // The smaller of two draws: low user numbers are the common ones.
  const std::uint32_t user = std::min(next_below(rng, 48), next_below(rng, 48));
  out += ";user=u";
  append_number(user, out);
  out += ";op=";
  const std::uint32_t op = next_below(rng, 8);  // reads and writes three times as often
  out += defect == 1 ? "fly" : parse::kOpNames[op < 3 ? 0 : op < 6 ? 1 : op - 4];
  out += ";bytes=";
  append_number((std::uint64_t{1} << next_below(rng, 17)) + next_below(rng, 512), out);
  if (defect == 2) out += 'x';
  out += defect == 3 ? ";latency_us" : ";latency_us=";
  append_number(next_below(rng, 5000), out);
  const std::uint32_t tags = next_below(rng, 4);
  for (std::uint32_t t = 0; t < tags; ++t) {
    out += t == 0 ? ";tags=" : "|";
    out += parse::kTagNames[next_below(rng, static_cast<std::uint32_t>(std::size(parse::kTagNames)))];
  }
  out += '\n';
}

WP_NOINLINE std::string generate_block(std::uint64_t seed, std::size_t size) {
  Rng rng{seed};
  std::string out;
  out.reserve(size + 128);
  // Ids rise from a per-block base, as in a log.
  std::uint64_t id = next_below(rng, 1u << 20) * 1000;
  while (out.size() < size) append_record(rng, id++, out);
  return out;
}

}  // namespace gen
