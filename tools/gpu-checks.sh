#!/usr/bin/env bash
# The checks a session that changed kernels runs on the GPU machine, in order of priority, each
# under its own time limit so that one hang cannot cost the rest; outputs under $OUT:
#   bash .device/on-device.sh bash tools/gpu-checks.sh [all|shapes|decode]
# all: selftest under the validation layer (every kernel), coopmat-generic's selftest through the
# KHR extension, the seed suite through coopmat-generic and coopmat-nv, the backward both ways;
# shapes: coopmat-generic's selftest in each other fp16 shape; decode: the decode suite vs PyTorch;
# bf16: selftests without the validation layer (which predates bf16 matrices), the seed suite in
# bfloat16 against PyTorch bf16 and against vkflex's own fp16, the backward in bf16.
set -u
out=${OUT:-/tmp}
what=${1:-all}
step() {  # step NAME SECONDS COMMAND...: runs, keeps stdout+stderr in $out/NAME.txt, prints the verdict lines
  local name=$1 secs=$2; shift 2
  echo "== $name ($(if [ "$what" = bf16 ]; then
  step selftest-bf16-nv 120 vkflex selftest --kernel coopmat-nv
  step selftest-bf16 120 vkflex selftest --kernel coopmat-generic
  step bench-bf16 150 bash .device/on-device.sh compare --dtype bfloat16
  tail -14 "$out/bench-bf16.txt"
  step bench-fp16 100 vkflex bench --suite seed --json "$out/fp16.jsonl"
  tail -12 "$out/bench-fp16.txt"
  VKFLEX_KERNEL=coopmat-generic step bench-backward-bf16 90 vkflex bench --suite seed --backward --dtype bfloat16 --cases causal,sliding_window_1024
  tail -6 "$out/bench-backward-bf16.txt"
fi
date -u +%H:%M:%S))"
  timeout "$secs" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $?"
  grep -E '^(FAIL|SKIP  .*coopmat)|passed, |validation|error' "$out/$name.txt" | head -40
}
vkflex devices > "$out/devices.txt" 2>&1; grep -iE 'name|subgroup|cooperative|shared' "$out/devices.txt" | head -20
if [ "$what" = all ]; then
  VKFLEX_VALIDATE=1 step selftest-validated 200 vkflex selftest --kernel all
  step selftest-generic-khr 60 vkflex selftest --kernel coopmat-generic
  VKFLEX_KERNEL=coopmat-generic step bench-generic 90 vkflex bench --suite seed --json "$out/generic.jsonl"
  tail -12 "$out/bench-generic.txt"
  VKFLEX_KERNEL=coopmat-nv step bench-nv 60 vkflex bench --suite seed --json "$out/nv.jsonl"
  tail -12 "$out/bench-nv.txt"
  VKFLEX_KERNEL=portable step bench-backward-portable 90 vkflex bench --suite seed --backward --cases causal,sliding_window_1024
  tail -6 "$out/bench-backward-portable.txt"
  VKFLEX_KERNEL=coopmat-generic step bench-backward-generic 60 vkflex bench --suite seed --backward --cases causal,sliding_window_1024
  tail -6 "$out/bench-backward-generic.txt"
fi
if [ "$what" = shapes ]; then
  for shape in 16x8x16 16x8x8; do
    VKFLEX_COOPMAT_SHAPE=$shape step "selftest-generic-$shape" 90 vkflex selftest --kernel coopmat-generic
  done
fi
if [ "$what" = decode ]; then
  step decode 150 bash .device/on-device.sh compare --suite decode
  tail -25 "$out/decode.txt"
fi
if [ "$what" = bf16 ]; then
  step selftest-bf16-nv 120 vkflex selftest --kernel coopmat-nv
  step selftest-bf16 120 vkflex selftest --kernel coopmat-generic
  step bench-bf16 150 bash .device/on-device.sh compare --dtype bfloat16
  tail -14 "$out/bench-bf16.txt"
  step bench-fp16 100 vkflex bench --suite seed --json "$out/fp16.jsonl"
  tail -12 "$out/bench-fp16.txt"
  VKFLEX_KERNEL=coopmat-generic step bench-backward-bf16 90 vkflex bench --suite seed --backward --dtype bfloat16 --cases causal,sliding_window_1024
  tail -6 "$out/bench-backward-bf16.txt"
fi
date -u
