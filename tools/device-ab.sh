#!/usr/bin/env bash
# On the GPU machine, from the repository root, after ../shared/device/prep.sh and
# tools/pack-before.sh REV packed .device/ (the current build and REV's):
#   bash .device/on-device.sh bash tools/device-ab.sh [ROUNDS] [bench options...]
# runs the seed suite (AB_SUITE=decode: the decode suite) through the two binaries interleaved,
# before/after ROUNDS times (default 3),
# one JSON line per case into $OUT/ab-before-N.jsonl and $OUT/ab-after-N.jsonl, then prints the
# median TFLOP/s of each side per case, their ratio and its geometric mean (tools/ab-summary.py).
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
