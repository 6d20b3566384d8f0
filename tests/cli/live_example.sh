#!/usr/bin/env bash
# live_example.sh TRAMWAY WORKER_POOL CYCLES — the issue's live acceptance on the example:
# runs worker_pool under `tramway run` (endless rounds), attaches and detaches its codec and
# parse functions CYCLES times through `tramway live`, stops it, and checks that it kept
# running and printed exactly what an untraced run of as many rounds prints.
# ctest runs a few cycles; run it by hand for the 1,000 of the issue.
set -euo pipefail
tramway=$1 worker_pool=$2 cycles=$3
dir=$(mktemp -d)
trap 'kill -9 $run_pid 2>/dev/null || true; rm -rf "$dir"' EXIT
args=(--threads 3 --jobs 100 --block-size 4096)

"$tramway" run -- "$worker_pool" "${args[@]}" --rounds 0 >"$dir/out" 2>"$dir/err" &
run_pid=$!
pid=
for _ in $(seq 1 200); do
  pid=$(sed -n 's/.* is running as pid \([0-9]*\);.*/\1/p' "$dir/err")
  [[ -n $pid ]] && break
  sleep 0.05
done
[[ -n $pid ]] || { echo "live_example: the program did not start: $(cat "$dir/err")"; exit 1; }

start=$(date +%s%N)
for i in $(seq 1 "$cycles"); do
  "$tramway" live "$pid" attach 'codec::*' -o "$dir/live.trace" >/dev/null
  "$tramway" live "$pid" attach 'parse::parse_record*' >/dev/null
  "$tramway" live "$pid" detach 'codec::*' >/dev/null
  "$tramway" live "$pid" detach 'parse::parse_record*' >/dev/null
  kill -0 "$pid" || { echo "live_example: the program died at cycle $i"; exit 1; }
  if ((i % 100 == 0)); then echo "live_example: $i cycles" >&2; fi
done
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
"$tramway" live "$pid" stop >/dev/null
kill -TERM "$pid"
wait "$run_pid" || true

rounds=$(grep -c '^round ' "$dir/out")
((rounds > 0)) || { echo "live_example: no round completed"; exit 1; }
"$worker_pool" "${args[@]}" --rounds "$rounds" >"$dir/expected"
if ! diff <(grep '^round ' "$dir/out") <(grep '^round ' "$dir/expected"); then
  echo "live_example: the traced run's output differs from an untraced run"
  exit 1
fi
"$tramway" report "$dir/live.trace" --limit 3 >/dev/null
echo "live_example: $cycles attach/detach cycles (4 live commands each) in ${elapsed_ms} ms; $rounds rounds identical to an untraced run"
