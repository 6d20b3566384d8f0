// Consumer of an installed tramway: a static key and a static call, switched and checked.
#include <cstdio>

#include "tramway/static_call.h"
#include "tramway/static_key.h"
#include "tramway/text/patch.h"

TRAMWAY_STATIC_KEY_FALSE(consumer_feature);

int twice(int x) { return 2 * x; }
int thrice(int x) { return 3 * x; }
TRAMWAY_DEFINE_STATIC_CALL(consumer_scale, twice);

// One branch site, not inlined, so that branch_count() is exactly 1.
__attribute__((noinline)) bool feature_on() { return TRAMWAY_STATIC_BRANCH_UNLIKELY(consumer_feature); }
__attribute__((noinline)) int scale(int x) { return TRAMWAY_STATIC_CALL(consumer_scale)(x); }

namespace {
int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "consumer: FAILED: %s\n", what);
    ++failures;
  }
}

bool ok(const tramway::Status& s, const char* what) {
  if (!s.ok()) std::fprintf(stderr, "consumer: %s: %s\n", what, s.message().c_str());
  expect(s.ok(), what);
  return s.ok();
}
}  // namespace

int main() {
  expect(tramway::branch_count(consumer_feature) == 1, "the key's one branch is registered");
  expect(!feature_on() && !consumer_feature.enabled(), "the key starts false");
  if (ok(tramway::enable(consumer_feature), "enable")) expect(feature_on(), "the branch is taken once enabled");
  if (ok(tramway::disable(consumer_feature), "disable")) expect(!feature_on(), "the branch is skipped once disabled");

  expect(scale(5) == 10, "the static call starts at twice()");
  if (ok(tramway::static_call_update(consumer_scale, &thrice), "update to thrice"))
    expect(scale(5) == 15, "the static call reaches thrice()");
  if (ok(tramway::static_call_update(consumer_scale, nullptr), "update to nullptr"))
    expect(scale(5) == 0, "a null int static call returns 0");
  if (ok(tramway::static_call_update(consumer_scale, &twice), "update back to twice"))
    expect(scale(5) == 10, "the static call is back at twice()");

  expect(tramway::text::stats().batches >= 5, "every switch was one batch");
  if (failures) return 1;
  std::printf("consumer: OK (static key and static call work from the installed package)\n");
  return 0;
}
