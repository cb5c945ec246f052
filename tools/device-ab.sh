#!/usr/bin/env bash
# On the GPU machine, from the repository root, after ../shared/device/prep.sh and
# tools/pack-before.sh REV packed .device/ (the current build and REV's):
#   bash .device/on-device.sh bash tools/device-ab.sh [ROUNDS] [bench options...]
# runs the seed suite (AB_SUITE=decode: the decode suite) through the two binaries interleaved,
# before/after ROUNDS times (default 3),
# one JSON line per case into $OUT/ab-before-N.jsonl and $OUT/ab-after-N.jsonl, then prints the
# median TFLOP/s of each side per case, their ratio and its geometric mean (tools/ab-summary.py),
# then the first calls of both (AB_FIRST_CALL, below). On an H100 a seed-suite run takes about
# 50 s and the first calls about a minute: 3 rounds need about 6.5 minutes (give it 450 s).
set -u
rounds=${1:-3}; shift || true
out=${OUT:-/tmp}
mkdir -p /tmp/vkflex-before
gunzip -c .device/vkflex-before.gz > /tmp/vkflex-before/vkflex && chmod +x /tmp/vkflex-before/vkflex
for i in $(seq 1 "$rounds"); do
  /tmp/vkflex-before/vkflex bench --suite "${AB_SUITE:-seed}" --json "$out/ab-before-$i.jsonl" "$@" || echo "before, round $i: exit $?"
  vkflex bench --suite "${AB_SUITE:-seed}" --json "$out/ab-after-$i.jsonl" "$@" || echo "after, round $i: exit $?"
done
python3 tools/ab-summary.py "$out"/ab-before-*.jsonl -- "$out"/ab-after-*.jsonl
# First calls (issue 19: cold and warm no worse than 1.1x before), AB_FIRST_CALL=N rounds
# (default 3, 0 skips): per side a cold process (new vkflex cache folder, new NVIDIA shader cache)
# then a warm one (both caches kept), a masked soft-capped call at S=512 on the default kernel.
fc=${AB_FIRST_CALL:-3}
for i in $(seq 1 "$fc"); do
  for side in before after; do
    bin=vkflex; [ "$side" = before ] && bin=/tmp/vkflex-before/vkflex
    d=$(mktemp -d); g=$(mktemp -d)
    for run in cold warm; do
      __GL_SHADER_DISK_CACHE_PATH=$g VKFLEX_CACHE_DIR=$d timeout 120 "$bin" bench --b 1 --h 1 --s 512 --d 64 \
        --mask-mod "q_idx >= kv_idx" --score-mod "20 * tanh(score / 20)" --json "$out/first-$side-$run-$i.jsonl" > /dev/null 2>&1 \
        || echo "first call, $side $run round $i: exit $?"
    done
    rm -rf "$d" "$g"
  done
done
[ "$fc" -gt 0 ] && python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
def med(side, run, field):
    v = [json.loads(open(f).readline()).get(field) for f in sorted(glob.glob(f"{out}/first-{side}-{run}-*.jsonl"))]
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else float("nan")
print("\n| first call | field | before ms (median) | after ms (median) | after/before |\n|---|---|---|---|---|")
for run in ("cold", "warm"):
    for field in ("first_call_ms", "compile_ms", "pipeline_ms"):
        b, a = med("before", run, field), med("after", run, field)
        print(f"| {run} | {field} | {b:.2f} | {a:.2f} | {a / b if b else float('nan'):.2f} |")
PY
