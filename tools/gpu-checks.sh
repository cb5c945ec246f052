#!/usr/bin/env bash
# The checks a session that changed kernels runs on the GPU machine, in order of priority, each
# under its own time limit so that one hang cannot cost the rest; outputs under $OUT:
#   bash .device/on-device.sh bash tools/gpu-checks.sh [all|next|short|s26|s26b|s25|s25b|d25|s24|s24b|s24c|cache23|cmp23|final23|doc-lse|final22|lean|gen-parts|nvr|regsm|waves|bf16|biases|shapes|decode|decode-quick|bwd|generic|recheck|occupancy|residency|tiles|decode-prefetch|decode-nv|mm-parts|nv-parts|splits]
# all: selftest under the validation layer (every kernel), the selftests without it (the KHR
# extension, bf16 matrices on), the seed suite through coopmat-nv and coopmat-generic, the
# backward through the matrix passes;
# bf16: the seed suite in bfloat16 against PyTorch bf16 (compare) and the backward in bf16;
# biases: learnable biases' gradients vs PyTorch and float64 (issue 21's rule);
# shapes: coopmat-generic's selftest in each other fp16 shape; decode: split-kv's validated
# selftest, the decode suite vs PyTorch (SELFTEST_ALL=1: then every kernel's validated selftest),
# the matrix kernel on the whole suite, tile and split sweeps (decode-sweeps.tar; DECODE_TILES,
# default "scalar": never the matrix kernel), two rounds of the large cases; decode-quick: the
# validated selftests (the matrix kernel's, every kernel's) and vkflex alone on the decode suite;
# bwd: coopmat-nv's selftest (forward and backward) and its backward on the seed suite, per tiles
# (BWD_TILES="4x64 4x32 ..." to sweep VKFLEX_BWD_TILES; BWD_CASES the cases); generic:
# coopmat-generic beside coopmat-nv per tiles (GEN_TILES, GEN_CASES; SASS=1 adds its machine code);
# recheck: every kernel's validated selftest, the split-KV matrix and scalar kernels on the 16-row
# cases, coopmat-generic on full and causal; occupancy: whether smaller workgroups / less shared
# memory let a compute unit run more than one workgroup at once; mm-parts: the split-KV matrix
# kernel's step with one part (loads, softmax, QK, PV) taken out at a time; nv-parts: the same for
# the NVIDIA-layout split-KV kernel (nv2: loads from memory, softmax); splits: the scalar
# split-KV kernel's split count per case (SPLIT_SWEEP); residency: how many
# workgroups an SM runs at once of each kernel (VKFLEX_RESIDENCY), with registers and shared memory;
# tiles: backward and coopmat-generic tile sweeps with the same probe; next: what the next call
# runs (docs/performance.md, eighteenth session), about 9 minutes, its files in next.tar; regsm:
# coopmat-generic's register softmax, its selftests and timings beside the shared one; waves: the NVIDIA-layout split-KV
# kernel's split count swept (WAVE_TILES, WAVES, WAVE_CASES: e.g. WAVE_TILES=scalar WAVES="2 8"
# WAVE_CASES=decode_dense_4k,decode_dense_32k,decode_long_128k for the scalar kernel); decode-nv: the NVIDIA-layout
# split-KV kernel's selftests (nv, nvs validated; nvrh on the KHR extension; nv2 on both), then
# it (nv2, nv, nvs, nvrs, nvrh) beside the scalar kernel on the decode suite, with its registers
# and the residency probe.
# Limits from the runs of 2026-12-05: the seed suite takes about 25 s per 4 cases through
# coopmat-nv on the H200 (the whole suite passed 120 s on an H100), 90 s per 7 through
# coopmat-generic; a compare about 150 s; on an H100 in the eighth session the decode step's
# compare took 145 s, a tile's sweep (3 cases, contiguous and paged) about 40 s, its selftest 6 s,
# the all-kernel validated selftest about 60 s (the decode bench's timed groups, added after, can
# add up to 2 s a row).
set -u
out=${OUT:-/tmp}
what=${1:-all}
# DEADLINE=s (seconds from the start): each step's limit shrinks to what is left and a step past it
# is skipped, so that a call sized to the device time left returns before the machine goes back.
step() {  # step NAME SECONDS COMMAND...: runs, keeps stdout+stderr in $out/NAME.txt, prints the verdict lines
  local name=$1 secs=$2; shift 2
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 5 ]; then echo "== $name skipped (DEADLINE)"; return; fi
    [ "$left" -lt "$secs" ] && secs=$left
  fi
  echo "== $name ($(date -u +%H:%M:%S))"
  timeout "$secs" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $?"
  grep -E '^FAIL|passed, |validation layer reported|rror' "$out/$name.txt" | head -20
}
# At most 8 files come back from a call, even one cut off at its time limit: each sweep's outputs
# go into one archive as soon as they are written.
sweep_keep() { (cd "$out" && tar rf decode-sweeps.tar "$@" && rm -f "$@"); }
# Pipelines the driver gave local memory (VKFLEX_PIPELINE_STATS=1 lines in FILE...): register
# arrays indexed at run time (a loop without [[unroll]]) or spills; NVIDIA reports 2^36 + bytes.
local_mem() {
  grep -h 'Local Memory Size' "$@" | awk '{ n = $0; sub(/^.*pipeline /, "", n); sub(/\]:.*$/, "]", n);
    l = $0; sub(/^.*Local Memory Size = /, "", l); sub(/,.*$/, "", l); b = l % 68719476736;
    if (b > 0 && !seen[n]++) print "   local memory " b " B: " substr(n, 1, 160) }' | head -20
}
# At most 8 files come back from a call ($OUT): the device listing goes to stdout only.
vkflex devices 2>&1 | grep -iE 'name|subgroup|cooperative|shared|bfloat16' | head -20
if [ "$what" = all ]; then
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  VKFLEX_PIPELINE_STATS=1 step selftest-nv 90 vkflex selftest --kernel coopmat-nv
  VKFLEX_PIPELINE_STATS=1 step selftest-generic 90 vkflex selftest --kernel coopmat-generic
  VKFLEX_PIPELINE_STATS=1 step selftest-portable 120 vkflex selftest --kernel portable
  local_mem "$out/selftest-nv.txt" "$out/selftest-generic.txt" "$out/selftest-portable.txt"
  VKFLEX_KERNEL=coopmat-nv step bench-nv 180 vkflex bench --suite seed --json "$out/nv.jsonl"
  tail -11 "$out/bench-nv.txt"
  VKFLEX_KERNEL=coopmat-generic step bench-generic 150 vkflex bench --suite seed --json "$out/generic.jsonl"
  tail -11 "$out/bench-generic.txt"
  VKFLEX_KERNEL=coopmat-generic step bench-backward-generic 90 vkflex bench --suite seed --backward --cases causal,sliding_window_1024
  tail -6 "$out/bench-backward-generic.txt"
fi
if [ "$what" = bf16 ]; then
  step compare-bf16 200 bash .device/on-device.sh compare --dtype bfloat16
  tail -12 "$out/compare-bf16.txt"
  VKFLEX_KERNEL=coopmat-generic step bench-backward-bf16 90 vkflex bench --suite seed --backward --dtype bfloat16 --cases causal,sliding_window_1024
  tail -6 "$out/bench-backward-bf16.txt"
fi
if [ "$what" = biases ]; then
  step biases 300 python3 tools/bias-grads-vs-torch.py --out "$out/biases.jsonl"
  tail -12 "$out/biases.txt"
fi
if [ "$what" = shapes ]; then
  for shape in 16x8x16 16x8x8; do
    VKFLEX_COOPMAT_SHAPE=$shape step "selftest-generic-$shape" 90 vkflex selftest --kernel coopmat-generic
  done
fi
if [ "$what" = decode ]; then
  VKFLEX_VALIDATE=1 step selftest-split-kv 90 vkflex selftest --kernel split-kv
  # The split-KV matrix kernel on every decode case (its default covers only calls with 8+ rows a KV head).
  VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=mm step selftest-split-kv-mm 90 vkflex selftest --kernel split-kv
  # With the driver's register and local-memory counts of the decode pipelines (stderr, same file).
  VKFLEX_PIPELINE_STATS=1 step decode 220 bash .device/on-device.sh compare --suite decode
  grep -E 'pipeline flex_attention_decode' "$out/decode.txt" | head -4 | sed -E 's/.*\[(.*)\]: Register Count = ([0-9]+).*/\1: \2 registers/'
  local_mem "$out/decode.txt"
  tail -12 "$out/decode.txt"
  # SELFTEST_ALL=1: every kernel's validated selftest next, before the sweeps (a session short of
  # device time gets the figures and the check first).
  [ "${SELFTEST_ALL:-0}" = 1 ] && VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  # The split count's target (workgroups per compute unit; default 4) and the tiles (mm: the
  # matrix kernel; scalar: never it; RxK[xL][xs]: the scalar kernel's rows per workgroup x keys
  # per slot and round [x invocations per key][x s: reduce-scatter], default 4x2), vkflex alone,
  # contiguous and paged rows (about 5 s a case on an H100), with the driver's register counts,
  # and each scalar tile's validated split-kv selftest (scalar: the default's, above; DECODE_TILES / DECODE_WAVES /
  # DECODE_CASES to sweep others).
  cases=${DECODE_CASES:-specdec_4_of_8k,decode_mqa_32k}
  for w in ${DECODE_WAVES:-}; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_WAVES=$w step "decode-waves-$w" 45 vkflex bench --suite decode --no-check --cases $cases
    grep -E " (no|yes) " "$out/decode-waves-$w.txt" | cut -c1-100
    sweep_keep "decode-waves-$w.txt"
  done
  # The matrix kernel on the whole suite (the compare's PyTorch rows, torch.jsonl, are the same
  # run's), with its JSON.
  VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_TILE=mm step decode-mm 100 vkflex bench --suite decode --no-check --json "$out/mm.jsonl"
  grep -E " (no|yes) " "$out/decode-mm.txt" | cut -c1-100
  grep -E 'pipeline flex_attention_decode_mm' "$out/decode-mm.txt" | head -1 | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \1 registers, local \2/'
  sweep_keep decode-mm.txt mm.jsonl
  for t in ${DECODE_TILES:-scalar}; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_TILE=$t step "decode-tile-$t" 75 vkflex bench --suite decode --no-check --cases $cases
    grep -E " (no|yes) " "$out/decode-tile-$t.txt" | cut -c1-100
    grep -E 'pipeline flex_attention_decode' "$out/decode-tile-$t.txt" | head -1 | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \1 registers, local \2/'
    [ "$t" = scalar ] || VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=$t step "selftest-tile-$t" 60 vkflex selftest --kernel split-kv
    sweep_keep "decode-tile-$t.txt" $(ls "$out/selftest-tile-$t.txt" 2>/dev/null | xargs -r -n1 basename)
  done
  # The large caches' timings moved up to 4x between rows in the eighth session: each case twice
  # with new buffers, every timed run's spread in the JSON (fw_ms_min / fw_ms_max).
  step decode-rounds 120 vkflex bench --suite decode --no-check --rounds 2 --json "$out/rounds.jsonl" \
    --cases ${DECODE_ROUND_CASES:-decode_dense_32k,decode_long_128k,specdec_4_of_8k}
  grep -E " (no|yes) " "$out/decode-rounds.txt" | cut -c1-100
  sweep_keep decode-rounds.txt rounds.jsonl
fi
if [ "$what" = decode-quick ]; then
  # For a call with little device time: the matrix kernel's and every kernel's validated selftests,
  # then vkflex alone on the decode suite (the planner's kernels), and the scalar kernel on the
  # 16-row cases.
  VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=mm step selftest-split-kv-mm 60 vkflex selftest --kernel split-kv
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  VKFLEX_PIPELINE_STATS=1 step decode-bench 120 vkflex bench --suite decode --json "$out/vkflex.jsonl"
  grep -E " (no|yes) " "$out/decode-bench.txt" | cut -c1-110
  grep -E 'pipeline flex_attention_decode' "$out/decode-bench.txt" | sed -E 's/.*pipeline (flex_attention_decode[_a-z]*).*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \1: \2 registers, local \3/' | sort -u | head -4
  VKFLEX_DECODE_TILE=scalar step decode-scalar 60 vkflex bench --suite decode --no-check --json "$out/scalar.jsonl" --cases specdec_4_of_8k,decode_mqa_32k
  grep -E " (no|yes) " "$out/decode-scalar.txt" | cut -c1-110
fi
if [ "$what" = generic ]; then
  # coopmat-generic against coopmat-nv (issue 26), the same cases in one run: GEN_CASES (default
  # the full and causal cases, D = 64 and 128) per tiles of GEN_TILES (default: the planner's and
  # the software pipeline, NSGxBKV[xp] as VKFLEX_GENERIC_TILES takes them), the driver's register
  # and local-memory counts; then with SASS=1 the generic pipelines' machine code
  # (tools/nvidia-sass; needs nvdisasm there and zstd, carried in .device/zstd).
  cases=${GEN_CASES:-full,causal}
  VKFLEX_KERNEL=coopmat-nv step gen-nv 90 vkflex bench --suite seed --no-check --cases "$cases"
  grep -E 'coopmat-nv ' "$out/gen-nv.txt" | cut -c1-100
  for t in ${GEN_TILES:-default 4x32xp}; do
    [ "$t" = default ] && unset VKFLEX_GENERIC_TILES || export VKFLEX_GENERIC_TILES=$t
    VKFLEX_PIPELINE_STATS=1 VKFLEX_KERNEL=coopmat-generic step "gen-$t" 120 vkflex bench --suite seed --no-check --cases "$cases"
    grep -E 'coopmat-generic |rror' "$out/gen-$t.txt" | cut -c1-100
    grep -E 'pipeline flex_attention_fwd_generic' "$out/gen-$t.txt" | sed -E 's/.*\[(.*)\]: Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \2 registers, local \3: \1/' | cut -c1-200 | sort -u | head -4
    local_mem "$out/gen-$t.txt"
  done
  unset VKFLEX_GENERIC_TILES
  if [ "${SASS:-0}" = 1 ]; then
    export PATH=$PATH:/usr/local/cuda-13.0/bin:$PWD/.device/zstd
    rm -rf /tmp/sass-cache
    VKFLEX_CACHE_DIR=/tmp/sass-cache VKFLEX_KERNEL=coopmat-generic step gen-sass-run 60 vkflex bench --b 1 --h 1 --s 1024 --d 64 --mask-mod "q_idx >= kv_idx" --repeat 1 --no-check
    step gen-sass 60 python3 tools/nvidia-sass/sass-dump.py /tmp/sass-cache/pipelines-*.bin "$out/sass"
    cat "$out/gen-sass.txt" | head -20
    (cd "$out" && tar cf sass.tar sass && rm -rf sass)
  fi
fi
if [ "$what" = recheck ]; then
  # After a kernel change, with little device time: every kernel's validated selftest, the
  # split-KV matrix kernel against the scalar one on the 16-row cases, coopmat-generic's planner
  # tiles on the full and causal cases.
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  cases=specdec_4_of_8k,decode_mqa_32k
  for t in mm scalar; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_TILE=$t step "decode-$t" 60 vkflex bench --suite decode --no-check --cases $cases --json "$out/decode-$t.jsonl"
    grep -E " (no|yes) " "$out/decode-$t.txt" | cut -c1-110
    grep -E 'pipeline flex_attention_decode' "$out/decode-$t.txt" | sed -E 's/.*pipeline (flex_attention_decode[_a-z]*).*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \1: \2 registers, local \3/' | sort -u | head -2
  done
  VKFLEX_PIPELINE_STATS=1 VKFLEX_KERNEL=coopmat-generic step gen 100 vkflex bench --suite seed --no-check --cases full,causal
  grep -E 'coopmat-generic |rror' "$out/gen.txt" | cut -c1-100
  grep -E 'pipeline flex_attention_fwd_generic' "$out/gen.txt" | sed -E 's/.*\[(.*)\]: Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \2 registers, local \3: \1/' | cut -c1-200 | sort -u | head -4
fi
if [ "$what" = occupancy ]; then
  # Does a compute unit run more than one workgroup of these kernels at once? (H100, 2026-12-06:
  # coopmat-generic's time grew with its workgroups from 128 on — one a compute unit — and the
  # split-KV kernels' stayed flat from 1 to 16 a compute unit: docs/performance.md.) The same work
  # in more, smaller workgroups: generic over H heads (128·H workgroups; default tiles, then 2x16
  # with less shared memory), the split-KV kernels over VKFLEX_DECODE_SPLITS on decode_mqa_32k
  # (8 x splits subgroups' splits; mm32 21 KB of shared memory, mm16 11 KB — 27 KB at 32 keys before O
  # crossed the score tile a fragment at a time — scalar ~10 KB). If time
  # falls with smaller shared memory and more workgroups, the driver's shared-memory carveout
  # holds the kernels to one workgroup a compute unit. First the matrix kernel's validated
  # selftests in both step sizes (after MM_STAGE it ran on a GPU only unchecked).
  for t in mm mm16 mm16x4; do
    VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=$t step "selftest-split-kv-$t" 60 vkflex selftest --kernel split-kv
  done
  for t in default 2x16; do
    [ "$t" = default ] && unset VKFLEX_GENERIC_TILES || export VKFLEX_GENERIC_TILES=$t
    for h in 1 2 4; do
      VKFLEX_PIPELINE_STATS=1 VKFLEX_KERNEL=coopmat-generic timeout 30 vkflex bench --b 1 --h $h --s 8192 --d 64 --no-check > "$out/occ.txt" 2>&1
      echo "generic $t H=$h: $(grep custom "$out/occ.txt" | cut -c58-90) $(grep -m1 'pipeline flex_attention_fwd_generic' "$out/occ.txt" | sed -E 's/.*Register Count = ([0-9]+).*Shared Memory Size = ([0-9]+).*/\1 registers, shared \2 B/')"
    done
  done
  unset VKFLEX_GENERIC_TILES
  # mm16x4 / mm32x2: four (two) subgroups a workgroup, each with tiles and a split of its own.
  for t in mm32 mm16 mm16x4 mm32x2 scalar; do
    for sp in 16 64 256; do
      VKFLEX_PIPELINE_STATS=1 VKFLEX_PROFILE=1 VKFLEX_DECODE_SPLITS=$sp VKFLEX_DECODE_TILE=$t timeout 30 vkflex bench --suite decode --no-check --cases decode_mqa_32k > "$out/occ.txt" 2>&1
      echo "$t splits=$sp: $(grep -A1 ' no ' "$out/occ.txt" | grep 'device time' | cut -c25-100) $(grep -m1 'pipeline flex_attention_decode' "$out/occ.txt" | sed -E 's/.*Register Count = ([0-9]+).*Shared Memory Size = ([0-9]+).*/\1 registers, shared \2 B/')"
    done
  done
  # The scalar kernel's 16-row cases with more rows a workgroup (4x2, the default, reads the cache
  # once per 4 rows; 8x2 once per 8), timed with the steady bench (earlier sweeps were not).
  for t in 4x2 8x2 16x1xs; do
    VKFLEX_PROFILE=1 VKFLEX_DECODE_TILE=$t timeout 40 vkflex bench --suite decode --no-check --cases specdec_4_of_8k,decode_mqa_32k > "$out/occ.txt" 2>&1
    grep -E ' (no|yes) |device time' "$out/occ.txt" | sed "s/^/$t /" | cut -c1-120
  done
  rm -f "$out/occ.txt"
fi
if [ "$what" = tiles ]; then
  # The thirteenth session's sweeps, with how many workgroups an SM ran of each: the coopmat-nv
  # backward per VKFLEX_BWD_TILES (BWD_TILES), coopmat-generic's forward per VKFLEX_GENERIC_TILES
  # (GEN_TILES), on the causal seed cases (D = 64 and 128); about 30 s a tile on an H100.
  export VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1
  # Default list: the dK/dV pass split in two dispatches (k: half the accumulators each), untried
  # since the owned rows stopped taking shared memory.
  for t in ${BWD_TILES:-default 8x32xpk 8x64xpk 4x32xpk}; do
    [ "$t" = default ] && unset VKFLEX_BWD_TILES || export VKFLEX_BWD_TILES=$t
    VKFLEX_RESIDENCY=flex_attention_bwd_nv step "tiles-bwd-$t" 100 vkflex bench --suite seed --backward --no-check --cases causal
    grep -E 'backward|residency' "$out/tiles-bwd-$t.txt" | grep -v 'no pipeline' | cut -c1-220
  done
  unset VKFLEX_BWD_TILES
  for t in ${GEN_TILES:-default 4x32xp}; do
    [ "$t" = default ] && unset VKFLEX_GENERIC_TILES || export VKFLEX_GENERIC_TILES=$t
    VKFLEX_RESIDENCY=flex_attention_fwd_generic VKFLEX_KERNEL=coopmat-generic step "tiles-gen-$t" 60 vkflex bench --suite seed --no-check --cases causal
    grep -E 'coopmat-generic |residency' "$out/tiles-gen-$t.txt" | cut -c1-220
  done
  unset VKFLEX_GENERIC_TILES VKFLEX_PROFILE VKFLEX_PIPELINE_STATS
fi
if [ "$what" = decode-prefetch ]; then
  # The split-KV matrix kernel with each step's K and V loaded a step ahead (DEC_PREFETCH, tiles
  # mm…p) against without and the scalar kernel, on the 16-row cases: validated selftests first.
  for t in mm16p mm16x4p; do
    VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=$t step "selftest-split-kv-$t" 60 vkflex selftest --kernel split-kv
  done
  for t in scalar mm16 mm16p mm16x4 mm16x4p mm32x2p; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_TILE=$t step "pf-$t" 45 vkflex bench --suite decode --no-check --cases specdec_4_of_8k,decode_mqa_32k
    grep -E " (no|yes) " "$out/pf-$t.txt" | sed "s/^/$t /" | cut -c1-120
    grep -E 'pipeline flex_attention_decode' "$out/pf-$t.txt" | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*Shared Memory Size = ([0-9]+).*/   \1 registers, local \2, shared \3/' | sort -u | head -2
  done
fi
# row_blocks SECS "TILES...": coopmat-generic with two row blocks a subgroup (GEN_RPW) under the
# validation layer (4x16xr2), then each VKFLEX_GENERIC_TILES value (default: the planner's) on full
# and causal, with its registers, local memory (spills) and shared memory.
row_blocks() {
  VKFLEX_VALIDATE=1 VKFLEX_GENERIC_TILES=4x16xr2 step selftest-generic-r2 40 vkflex selftest --kernel coopmat-generic
  grep -E "passed, " "$out/selftest-generic-r2.txt" | tail -1 | cut -c1-160
  local t
  for t in $2; do
    if [ "$t" = default ]; then unset VKFLEX_GENERIC_TILES; else export VKFLEX_GENERIC_TILES=$t; fi
    VKFLEX_PIPELINE_STATS=1 VKFLEX_KERNEL=coopmat-generic step "rpw-$t" "$1" vkflex bench --suite seed --no-check --cases full,causal
    grep -E "^ *(full|causal) " "$out/rpw-$t.txt" | sed "s/^/$t /" | cut -c1-140
    grep -E 'pipeline flex_attention_fwd_generic' "$out/rpw-$t.txt" | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*Shared Memory Size = ([0-9]+).*/   \1 registers, local \2, shared \3/' | sort -u | head -2
  done
  unset VKFLEX_GENERIC_TILES
}
# gen_parts SECS "TILES..." [CASES]: where coopmat-generic's step goes (issue 26: 0.2x coopmat-nv on the
# H100, whatever its tiles): the planner's kernel (register softmax, no software pipeline) with one
# part taken out at a time, results wrong (--no-check), on full and causal (D = 64 and 128), per
# VKFLEX_GENERIC_TILES value (default: the planner's). Variants are patched copies of Shaders/
# (VKFLEX_SHADER_DIR): no-loads (K and V staged from the walk's first 16 keys, which stay in
# cache: global memory's share), no-barriers (the two workgroup barriers a step), no-elem (the
# per-element scale, mods, mask and maximum test), no-p (P's element stores to shared memory),
# no-qk / no-pv (the products), no-rowsum (the row sums' product with ones).
gen_parts() {
  python3 - "$PWD/Shaders" /tmp/gen-parts <<'PY'
import os, sys
sys.path.insert(0, "tools"); import shader_variants
src, dst = sys.argv[1], sys.argv[2]
g, st = "flex_attention_fwd_generic.comp", "flex_mm_step.glsl"
variants = {
    "no-loads": [(g, "#define K_UNIT(j, u) unit_k_data(koff + kv_row(b, k0 + (j)) * p.k_sl, p.k_sd, u)", "#define K_UNIT(j, u) unit_k_data(koff + kv_row(b, (j)) * p.k_sl, p.k_sd, u)"),
                 (g, "#define V_UNIT(j, u) unit_v_data(voff + kv_row(b, k0 + (j)) * p.v_sl, p.v_sd, u)", "#define V_UNIT(j, u) unit_v_data(voff + kv_row(b, (j)) * p.v_sl, p.v_sd, u)")],
    "no-barriers": [(g, "                barrier();\n                // S = Q K", "                // S = Q K"),
                    (g, "                barrier();   // every subgroup is done with this K/V tile", "                // every subgroup is done with this K/V tile")],
    "no-elem": [(st, "const float v_ = mm_score(s_[b_ * MM_NS + nn_][i_], (R0) + b_ * MM + r_, nn_ * MN + e_ - r_ * MN); \\", "const float v_ = s_[b_ * MM_NS + nn_][i_] * 0.125; \\")],
    "no-p": [(st, "                    Ps[((R0) + b_ * MM + r_) * PST + nn_ * MN + e_ - r_ * MN] = TO_HALF(", "                    if (s_[b_ * MM_NS + nn_][i_] == 12345.0) Ps[((R0) + b_ * MM + r_) * PST + nn_ * MN + e_ - r_ * MN] = TO_HALF(")],
    "no-qk": [(st, "            S[b_ * MM_NS + (NN)] = coopMatMulAddNV(QF[b_ * (D / MK) + kk_], kt_, S[b_ * MM_NS + (NN)]); \\", "            if (kk_ == 99) S[b_ * MM_NS + (NN)] = coopMatMulAddNV(QF[b_ * (D / MK) + kk_], kt_, S[b_ * MM_NS + (NN)]); \\")],
    "no-pv": [(st, "                O[b_ * (DV / MN) + nn_] = coopMatMulAddNV(PF[b_ * (BKV / MK) + kk_], vf_, O[b_ * (DV / MN) + nn_]); \\", "                if (kk_ == 99) O[b_ * (DV / MN) + nn_] = coopMatMulAddNV(PF[b_ * (BKV / MK) + kk_], vf_, O[b_ * (DV / MN) + nn_]); \\")],
    "no-rowsum": [(st, "            LS[b_] = coopMatMulAddNV(pf_[b_ * (BKV / MK) + kk_], ones_, LS[b_]); \\", "            if (kk_ == 99) LS[b_] = coopMatMulAddNV(pf_[b_ * (BKV / MK) + kk_], ones_, LS[b_]); \\")],
}
shader_variants.make(src, dst, variants, "gen-parts")
PY
  local t v
  for t in $2; do
    if [ "$t" = default ]; then unset VKFLEX_GENERIC_TILES; else export VKFLEX_GENERIC_TILES=$t; fi
    for v in base no-loads no-barriers no-elem no-p no-qk no-pv no-rowsum; do
      [ "$v" = base ] && unset VKFLEX_SHADER_DIR || export VKFLEX_SHADER_DIR=/tmp/gen-parts/$v
      VKFLEX_KERNEL=coopmat-generic step "gen-parts-$t-$v" "$1" vkflex bench --suite seed --no-check --cases "${3:-full,causal}"
      grep -E "^ *(full|causal) " "$out/gen-parts-$t-$v.txt" | sed "s/^/$t $v /" | cut -c1-140
    done
  done
  unset VKFLEX_SHADER_DIR VKFLEX_GENERIC_TILES
}
if [ "$what" = gen-parts ]; then
  gen_parts 30 "${PARTS_TILES:-default}"
fi
if [ "$what" = lean ]; then
  # For a call with little device time left (nineteenth session): every kernel's selftest under
  # the validation layer, coopmat-generic's row blocks (GEN_RPW) under it, then their timings
  # beside the default on full and causal, then where its step goes (gen_parts). DEADLINE trims it.
  VKFLEX_VALIDATE=1 step selftest-validated 130 vkflex selftest --kernel all
  row_blocks 30 "${RPW_TILES:-4x16xr2 default 4x16xp1 2x16xr2}"
  gen_parts 25 default causal
  (cd "$out" && tar cf lean.tar --exclude lean.tar . 2>/dev/null && find . -type f ! -name lean.tar -delete)
fi
# PyTorch's own test rule on the same inputs (issue 20's H200 criterion), SECONDS at most:
# tools/conformance.py --torch on 40 prefill and backward cases.
torch_rule() {
  step torch-rule "$1" python3 tools/conformance.py --torch --kinds prefill,backward --cases 40 --seed 20261207
  grep -E "failed|PyTorch " "$out/torch-rule.txt"
}
if [ "$what" = short ]; then
  # For a call with little device time (twenty-first session): the validated selftest, PyTorch's
  # test rule on the same inputs, on an H200 (H200=1) the decode suite beside PyTorch, then the KHR selftest.
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  torch_rule 100
  [ "${H200:-0}" = 1 ] && { step compare-decode 220 bash .device/on-device.sh compare --suite decode; tail -12 "$out/compare-decode.txt"; }
  step selftest-khr 150 vkflex selftest --kernel all
  (cd "$out" && tar cf short.tar --exclude short.tar . 2>/dev/null && find . -type f ! -name short.tar -delete)
fi
# /tmp/nohoist: the working tree's shaders without the NV backward's per-head hoist (ac5d29e), for
# VKFLEX_SHADER_DIR A/B runs.
nohoist_shaders() {
  rm -rf /tmp/nohoist && cp -r Shaders /tmp/nohoist && sed -i '/^#define VKF_HOIST_BH 1$/d' /tmp/nohoist/flex_attention_bwd_nv.comp
}
if [ "$what" = final22 ]; then
  # Twenty-second session's last call: every kernel's validated selftest (float32 row sums in
  # coopmat-generic too; the NV backward's per-row and per-key mask values), PyTorch's rule on the
  # same inputs, then document_causal's and alibi_causal's backward with the per-head hoist in the
  # NV backward (the binary's) and without it (a copy of Shaders/ without its VKF_HOIST_BH line),
  # in turn, twice, with each pass's time and the host's share of a call.
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  nohoist_shaders
  bwd_ab() {  # bwd_ab ROUND: the backward with the binary's shaders, then without the hoist
    for v in hoist nohoist; do
      dir=""; [ "$v" = nohoist ] && dir=/tmp/nohoist
      VKFLEX_SHADER_DIR=$dir VKFLEX_PROFILE=1 step bwd-$v-$1 45 vkflex bench --suite seed --backward --no-check --repeat 6 --cases document_causal,alibi_causal
      grep -E "backward|device time per call: flex_attention_bwd" "$out/bwd-$v-$1.txt" | cut -c1-160
    done
  }
  bwd_ab 1
  torch_rule 120
  bwd_ab 2
  VKFLEX_SHADER_DIR=/tmp/nohoist step selftest-nohoist 60 vkflex selftest --kernel coopmat-nv
  (cd "$out" && tar cf final22.tar --exclude final22.tar . 2>/dev/null && find . -type f ! -name final22.tar -delete)
fi
if [ "$what" = cache23 ]; then
  # Twenty-third session's first call: the backward with the large-buffer cache (host µs per call
  # should fall from 12.6-17.2 ms to tens; document_causal's call to its passes' time), PyTorch on
  # the same backward (issue 20's bar), every kernel's validated selftest, PyTorch's rule.
  VKFLEX_PROFILE=1 step bwd-cache 120 vkflex bench --suite seed --backward --no-check --repeat 6
  grep -E "backward|device time per call: flex_attention_bwd" "$out/bwd-cache.txt" | cut -c1-170
  step compare-bwd 240 bash .device/on-device.sh compare --backward
  tail -16 "$out/compare-bwd.txt"
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  torch_rule 80
  (cd "$out" && tar cf cache23.tar --exclude cache23.tar . 2>/dev/null && find . -type f ! -name cache23.tar -delete)
fi
# ab24 VARIANT...: the backward on AB_CASES (default full,sliding_window_1024) with one of the
# twenty-fourth session's changes taken out — overlap0: the barrier between the dQ and dK/dV passes
# back; prevnv: the NV backward shader from before the session, in a copy of Shaders/ made here
# before prep.sh (`cp -r Shaders .device/shaders-prev-nv && git show
# 1794554:Shaders/flex_attention_bwd_nv.comp > .device/shaders-prev-nv/flex_attention_bwd_nv.comp`);
# any other name: as built.
ab24() {
  local v
  for v in "$@"; do
    case $v in
      overlap0) env=(VKFLEX_BWD_OVERLAP=0) ;;
      prevnv) env=(VKFLEX_SHADER_DIR=$PWD/.device/shaders-prev-nv) ;;
      *) env=() ;;
    esac
    step "ab-$v" 60 env "${env[@]}" vkflex bench --suite seed --backward --no-check --cases "${AB_CASES:-full,sliding_window_1024}"
    grep -E "backward" "$out/ab-$v.txt" | cut -c1-150
  done
}
# bwd_sweep D B "TILES...": the full backward (B x 16 x 8192, head dim D) with each of the coopmat-nv
# backward tiles (default: the planner's; else forced for head dim D only), with registers and
# local memory; sets best, best_tf and base_tf (the planner's TFLOP/s).
bwd_sweep() {
  local d=$1 b=$2 t n tf
  best=default; best_tf=0; base_tf=0
  for t in $3; do
    n=bwd$d-${t//\//_}
    if [ "$t" = default ]; then env=(); else env=(VKFLEX_BWD_TILES=$d:$t); fi
    VKFLEX_PIPELINE_STATS=1 step "$n" 50 env "${env[@]}" vkflex bench --b $b --h 16 --s 8192 --d $d --backward --no-check
    grep -E "backward" "$out/$n.txt" | cut -c1-170
    local_mem "$out/$n.txt" | grep bwd_nv
    grep -E 'pipeline flex_attention_bwd_nv.*Register Count' "$out/$n.txt" | sed -E 's/.*pipeline (flex_attention_bwd_nv[^ ]*).*Register Count = ([0-9]+).*/   \1: \2 registers/' | sort -u | head -4
    tf=$(grep -E " backward " "$out/$n.txt" | sed -E 's/.* ([0-9.]+) TFLOP\/s.*/\1/' | head -1)
    [ -n "$tf" ] || continue
    [ "$t" = default ] && base_tf=$tf
    if awk -v a="$tf" -v b="$best_tf" 'BEGIN { exit !(a > b) }'; then best=$t; best_tf=$tf; fi
  done
}
# decode_times NAME: the decode suite with each dispatch's time, then nvrh's residency on the
# 16-row cases (how many subgroups an SM runs, and each one's run).
decode_times() {
  VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1 step "$1" 120 stdbuf -oL vkflex bench --suite decode --no-check
  grep -E " (no|yes) |device time" "$out/$1.txt" | cut -c1-160
  VKFLEX_RESIDENCY=flex_attention_decode_nv VKFLEX_PROFILE=1 step res-nvrh 40 vkflex bench --suite decode --no-check --cases specdec_4_of_8k,decode_mqa_32k
  grep -E '^(specdec|decode)|residency' "$out/res-nvrh.txt" | cut -c1-260
}
# split_counts NAME CASE LIMIT N...: CASE of the decode suite at each forced split count, with
# each dispatch's time ($out/NAME-splits-N.txt).
split_counts() {
  local name=$1 c=$2 secs=$3 n; shift 3
  for n in "$@"; do
    VKFLEX_PROFILE=1 VKFLEX_DECODE_SPLITS=$n step "$name-splits-$n" "$secs" vkflex bench --suite decode --no-check --cases "$c"
    grep -E " (no|yes) |device time" "$out/$name-splits-$n.txt" | sed "s/^/splits $n /" | cut -c1-160
  done
}
# klines_ab: the NVIDIA-layout split-KV kernel without and with K's loads eight lanes a row
# (VKFLEX_DECODE_KLINES) on the 16-row cases, with its registers, then that variant's selftest on
# the KHR extension (where nvrh runs).
klines_ab() {
  local k
  for k in 0 1; do
    VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_KLINES=$k step "klines-$k" 30 vkflex bench --suite decode --no-check --cases decode_mqa_32k,specdec_4_of_8k
    grep -E " (no|yes) |device time" "$out/klines-$k.txt" | sed "s/^/klines $k /" | cut -c1-160
    grep -E 'pipeline flex_attention_decode_nv' "$out/klines-$k.txt" | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \1 registers, local \2/' | sort -u | head -2
  done
  VKFLEX_DECODE_TILE=nvrh VKFLEX_DECODE_KLINES=1 step selftest-klines 40 vkflex selftest --kernel split-kv
}
# mqa_parts LIMIT: where nvrh's chunk goes on decode_mqa_32k (d25: an SM moved 12-14 KB/µs at
# 4 or 8 subgroups). Patched shaders, results wrong (--no-check): `k-lines` loads K's words with
# eight lanes a row (128 bytes of each of four rows an instruction, as V's loads and the scalar
# kernel's read) where the B operand's layout gives four (64 bytes of each of eight rows) —
# whether K's half-line loads cap an SM's bandwidth; `no-k` and `no-loads` take K's (and V's)
# words from a value instead of memory. D = 128 only (the patch's K rows hold 16 words).
mqa_parts() {
  python3 - "$PWD/Shaders" /tmp/mqa-parts <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tools"))
import shader_variants
src, dst = sys.argv[1], sys.argv[2]
f = "flex_attention_decode_nv.comp"
k_old = """#define LOAD_K_WORDS(ROW, KR) { \\
    [[unroll]] for (int i = 0; i < 2; ++i) WORDS(k_w4, k_w2, k_w1, KR, i * KW, (koff + ((ROW) + lane_r + 8 * i) * p.k_sl) / 2 + K_WORD(lane & 3, 0), KW, K_G) }"""
k_lines = """#define LOAD_K_WORDS(ROW, KR) { \\
    [[unroll]] for (int q_ = 0; q_ < 4; ++q_) [[unroll]] for (int h_ = 0; h_ < 2; ++h_) { \\
        const uvec4 u_ = k_w4[(koff + ((ROW) + (lane >> 3) + 4 * q_) * p.k_sl) / 8 + 8 * h_ + (lane & 7)]; \\
        const int a_ = 4 * (2 * q_ + h_); KR[a_] = u_.x; KR[a_ + 1] = u_.y; KR[a_ + 2] = u_.z; KR[a_ + 3] = u_.w; } }"""
k_none = """#define LOAD_K_WORDS(ROW, KR) { [[unroll]] for (int x_ = 0; x_ < 2 * KW; ++x_) KR[x_] = uint((ROW) + x_) * 0x00010001u; }"""
v_old = """#define LOAD_V_WORDS(ROW, VR) { \\
    [[unroll]] for (int j = 0; j < 4; ++j) WORDS(v_w4, v_w2, v_w1, VR, j * VW, (voff + ((ROW) + lane_c + (j & 1) + 8 * (j >> 1)) * p.v_sl) / 2 + V_WORD(lane_r, 0), VW, V_G) }"""
v_none = """#define LOAD_V_WORDS(ROW, VR) { [[unroll]] for (int x_ = 0; x_ < 4 * VW; ++x_) VR[x_] = uint((ROW) + x_) * 0x00010001u; }"""
variants = {"k-lines": [(k_old, k_lines)], "no-k": [(k_old, k_none)], "no-loads": [(k_old, k_none), (v_old, v_none)]}
shader_variants.write(src, dst, f, variants)
PY
  for v in base k-lines no-k no-loads; do
    [ "$v" = base ] && unset VKFLEX_SHADER_DIR || export VKFLEX_SHADER_DIR=/tmp/mqa-parts/$v
    VKFLEX_PROFILE=1 step "mqa-parts-$v" "$1" vkflex bench --suite decode --no-check --cases ${PARTS_CASES:-decode_mqa_32k}
    grep -E " (no|yes) |device time" "$out/mqa-parts-$v.txt" | sed "s/^/$v /" | cut -c1-160
  done
  unset VKFLEX_SHADER_DIR
}
if [ "$what" = s26 ]; then
  # The twenty-sixth session's first call (about 560 s; on an H200 it is every open bar but 26's):
  # every kernel's validated selftest of the final code (the dQ pass's 64-row steps above D = 64,
  # the half wave for short splits, DEC_KLINES compiled out by default), the backward beside
  # PyTorch (issue 20), the decode suite beside PyTorch (issue 22: decode_mqa_32k now 66 splits).
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  step compare-bwd 300 bash .device/on-device.sh compare --backward
  tail -12 "$out/compare-bwd.txt"
  step compare-decode 220 bash .device/on-device.sh compare --suite decode
  tail -10 "$out/compare-decode.txt"
  (cd "$out" && tar cf s26.tar --exclude s26.tar . 2>/dev/null && find . -type f ! -name s26.tar -delete)
fi
if [ "$what" = s26b ]; then
  # The second call: K's loads eight lanes a row beside nvrh with its selftest, where nvrh's chunk
  # goes (mqa_parts), speculative decoding's and MQA's split counts, then the D = 64 backward
  # tiles with the dQ pass apart (full, 16x16x8192).
  klines_ab
  mqa_parts 20
  split_counts mqa decode_mqa_32k 20 33 44 132
  split_counts specdec specdec_4_of_8k 20 8 12
  bwd_sweep 64 16 "default 8x64/8x64xp 8x64xp/8x128xp 8x64xp/8x128"
  echo "== D = 64: best $best ($best_tf; the planner's $base_tf)"
  (cd "$out" && tar cf s26b.tar --exclude s26b.tar . 2>/dev/null && find . -type f ! -name s26b.tar -delete)
fi
if [ "$what" = s25 ]; then
  # Twenty-fifth session: every kernel's validated selftest; the dQ pass's 64-row steps and the
  # dK/dV pass without prefetch at D = 128 (full, 8x16x8192) beside the planner's, with registers;
  # the fastest, if it beats the planner's by more than 1%, forced at D = 128 only (`128:` prefix)
  # for coopmat-nv's validated selftest and `compare --backward` (issue 20's bar); then ab24.
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  bwd_sweep 128 8 "default 8x64/8x32xp 8x64xp/8x32xp 8x32xp/8x32"
  if [ "$best" != default ] && awk -v a="$best_tf" -v b="$base_tf" 'BEGIN { exit !(a > 1.01 * b) }'; then
    export VKFLEX_BWD_TILES=128:$best
    echo "== D = 128 tiles for the compare: $best ($best_tf against $base_tf TFLOP/s)"
    VKFLEX_VALIDATE=1 step selftest-nv-tiles 90 vkflex selftest --kernel coopmat-nv
  else
    echo "== D = 128 tiles for the compare: the planner's ($base_tf; best other $best $best_tf)"
  fi
  step compare-bwd 480 bash .device/on-device.sh compare --backward
  tail -24 "$out/compare-bwd.txt"
  unset VKFLEX_BWD_TILES
  ab24 overlap0 prevnv
  (cd "$out" && tar cf s25.tar --exclude s25.tar . 2>/dev/null && find . -type f ! -name s25.tar -delete)
fi
if [ "$what" = s25b ]; then
  # The second call: the planner's D = 128 tiles are now s25's winner (the dQ pass 64 rows a
  # step without prefetch). Each head dim's candidates beside the planner's — at D = 64 (full,
  # 16x16x8192) the dQ pass without prefetch or with 128-row steps and the dK/dV pass (one
  # workgroup an SM by its registers either way) with 128-row steps; at D = 128 the dK/dV pass
  # with 64-row steps — the fastest of each head dim (more than 1% over the planner's) forced
  # for coopmat-nv's validated selftest and `compare --backward`.
  forced=()
  # SKIP_SWEEP=1: the planner's tiles only (the selftest and the compare).
  [ "${SKIP_SWEEP:-0}" = 1 ] || for d in 64 128; do
    if [ $d = 64 ]; then cands=${S25B_64:-"default 8x64/8x64xp 8x64xp/8x128xp"}; b=16; else cands=${S25B_128:-"default 8x64/8x64"}; b=8; fi
    bwd_sweep $d $b "$cands"
    echo "== D = $d: best $best ($best_tf; the planner's $base_tf)"
    if [ "$best" != default ] && awk -v a="$best_tf" -v b="$base_tf" 'BEGIN { exit !(a > 1.01 * b) }'; then forced+=("$d:$best"); fi
  done
  if [ ${#forced[@]} -gt 0 ]; then
    export VKFLEX_BWD_TILES=$(IFS=,; echo "${forced[*]}")
    echo "== forced for the compare: VKFLEX_BWD_TILES=$VKFLEX_BWD_TILES"
  fi
  [ "${SKIP_SELFTEST:-0}" = 1 ] || VKFLEX_VALIDATE=1 step selftest-nv 90 vkflex selftest --kernel coopmat-nv
  # decode_mqa_32k's split count below the planner's 132 (66 took 12% less, d25): about 8 s each.
  split_counts mqa decode_mqa_32k 20 ${MQA_SPLITS:-33 44 66 132}
  step compare-bwd 480 bash .device/on-device.sh compare --backward
  tail -12 "$out/compare-bwd.txt"
  unset VKFLEX_BWD_TILES
  # As time allows: speculative decoding's split count below the planner's 16.
  split_counts specdec specdec_4_of_8k 20 8 12 16
  (cd "$out" && tar cf s25b.tar --exclude s25b.tar . 2>/dev/null && find . -type f ! -name s25b.tar -delete)
fi
if [ "$what" = d25 ]; then
  # Issue 22's decode_mqa_32k (1.88 TB/s on the H200, 2.4 wanted): each dispatch's time (kernel,
  # merge), nvrh's residency on the 16-row cases (each subgroup's start and length), and MQA's
  # split count. (Its first run, 13:39, also tried nvrd, since removed.)
  decode_times d25-decode
  split_counts mqa decode_mqa_32k 30 66 99 132 264
  (cd "$out" && tar cf d25.tar --exclude d25.tar . 2>/dev/null && find . -type f ! -name d25.tar -delete)
fi
if [ "$what" = s24 ]; then
  # Twenty-fourth session's first call: the backward against PyTorch (the Δ pass with 16
  # invocations a row, the dK/dV pass beside the dQ pass, the dK/dV pass's LSE in log2 units made
  # once per staged row, the checked steps' select), after every kernel's validated selftest.
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  step compare-bwd 480 bash .device/on-device.sh compare --backward
  tail -24 "$out/compare-bwd.txt"
  # Then, as time allows, two of the changes taken out (s24b's first rows).
  ab24 overlap0 prevnv
  (cd "$out" && tar cf s24.tar --exclude s24.tar . 2>/dev/null && find . -type f ! -name s24.tar -delete)
fi
if [ "$what" = s24c ]; then
  # For a call with little device time: every kernel's validated selftest, vkflex's backward on the
  # seed suite (no PyTorch), then two of the session's changes taken out.
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  step bwd-seed 240 vkflex bench --suite seed --backward --no-check --json "$out/bwd-seed.jsonl"
  grep -E "backward" "$out/bwd-seed.txt" | cut -c1-150
  ab24 overlap0 prevnv
  (cd "$out" && tar cf s24c.tar --exclude s24c.tar . 2>/dev/null && find . -type f ! -name s24c.tar -delete)
fi
if [ "$what" = s24b ]; then
  # Each of the session's changes taken out in turn (the barrier between the dQ and dK/dV passes:
  # VKFLEX_BWD_OVERLAP=0; the NV backward's element-wise changes: .device/shaders-prev-nv, the
  # shader before them), then each pass's time (VKFLEX_PROFILE keeps the barrier), then the dQ
  # pass's steps at D = 128.
  AB_CASES=${AB_CASES:-full,sliding_window_1024,causal} ab24 new overlap0 prevnv new2
  VKFLEX_PROFILE=1 step bwd-profile 90 vkflex bench --suite seed --backward --no-check --repeat 5 --cases full,sliding_window_1024
  grep -E "backward|device time per call: flex_attention_bwd" "$out/bwd-profile.txt" | cut -c1-170
  # The dQ pass's steps at D = 128: 64 rows (one workgroup an SM either way: 218 registers);
  # the dK/dV pass without its prefetch's registers (255 and local memory with it).
  for t in "" 8x64/8x32xp 8x64xp/8x32xp 8x32xp/8x32; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_BWD_TILES=$t step "bwd128-${t//\//_}" 50 vkflex bench --b 8 --h 16 --s 8192 --d 128 --backward --no-check
    grep -E "backward" "$out/bwd128-${t//\//_}.txt" | cut -c1-170
    local_mem "$out/bwd128-${t//\//_}.txt"
    grep -E 'pipeline flex_attention_bwd_nv.*Register Count' "$out/bwd128-${t//\//_}.txt" | sed -E 's/.*pipeline (flex_attention_bwd_nv[^ ]*).*Register Count = ([0-9]+).*/   \1: \2 registers/' | sort -u | head -4
  done
  (cd "$out" && tar cf s24b.tar --exclude s24b.tar . 2>/dev/null && find . -type f ! -name s24b.tar -delete)
fi
if [ "$what" = cmp23 ]; then
  # The backward against PyTorch with the backward's warm-up in bench (the first call's
  # compare-bwd took more than 240 s and lost PyTorch's last cases).
  step compare-bwd 480 bash .device/on-device.sh compare --backward
  tail -24 "$out/compare-bwd.txt"
  (cd "$out" && tar cf cmp23.tar --exclude cmp23.tar . 2>/dev/null && find . -type f ! -name cmp23.tar -delete)
fi
if [ "$what" = final23 ]; then
  # Twenty-third session's kernels: every kernel's validated selftest, PyTorch's rule (the exact
  # tanh where the LSE is returned; coopmat-generic's two row sums in bfloat16), what those cost
  # the soft-cap forward (returning the LSE or not), then the D = 128 backward with the dK/dV pass
  # in two dispatches beside the default tiles.
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  torch_rule 120
  for lse in "" --return-lse; do
    step "fwd-softcap$lse" 40 vkflex bench --suite seed --no-check --repeat 20 --cases softcap20_causal,alibi_causal $lse
    grep -E "coopmat|portable" "$out/fwd-softcap$lse.txt" | cut -c1-150
  done
  for t in "" 8x32xp/8x32xpk; do
    VKFLEX_BWD_TILES=$t step "bwd128-${t//\//_}" 50 vkflex bench --b 8 --h 16 --s 8192 --d 128 --backward --no-check
    grep -E "backward" "$out/bwd128-${t//\//_}.txt" | cut -c1-150
  done
  (cd "$out" && tar cf final23.tar --exclude final23.tar . 2>/dev/null && find . -type f ! -name final23.tar -delete)
fi
if [ "$what" = doc-lse ]; then
  # Twenty-second session, in priority order: document_causal's backward (0.15x PyTorch on the
  # H200) each pass's time beside causal's, with the registers and local memory of its pipelines;
  # the same without the per-head hoist in the NV backward (ac5d29e: a copy of Shaders/ with its
  # VKF_HOIST_BH line taken out, through VKFLEX_SHADER_DIR); then float32 row sums where the call
  # returns the LSE (exactRowSums): every kernel's validated selftest, PyTorch's rule on the same
  # inputs, and the forward returning the LSE beside the forward without it (what the sums cost).
  VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1 step bwd-document 90 vkflex bench --suite seed --backward --no-check --repeat 5 --cases document_causal,causal
  grep -E "backward|device time|flex_attention" "$out/bwd-document.txt" | grep -v Stat | cut -c1-200 | head -24
  local_mem "$out/bwd-document.txt"
  nohoist_shaders
  grep -c VKF_HOIST_BH /tmp/nohoist/flex_attention_bwd_nv.comp
  VKFLEX_SHADER_DIR=/tmp/nohoist VKFLEX_PROFILE=1 step bwd-document-nohoist 60 vkflex bench --suite seed --backward --no-check --repeat 5 --cases document_causal
  grep -E "backward|device time|flex_attention" "$out/bwd-document-nohoist.txt" | cut -c1-200 | head -12
  # The working tree's shaders (the document ids loaded once per row and column in the NV
  # backward, VKF_HAS_MASK_RC), before the binary embeds them.
  VKFLEX_SHADER_DIR=$PWD/Shaders VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1 step bwd-document-rc 60 vkflex bench --suite seed --backward --no-check --repeat 5 --cases document_causal
  grep -E "backward|device time|flex_attention" "$out/bwd-document-rc.txt" | grep -v Stat | cut -c1-200 | head -12
  local_mem "$out/bwd-document-rc.txt"
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  torch_rule 120
  step fwd-nolse 75 vkflex bench --suite seed --no-check --repeat 20
  grep -E "coopmat|portable" "$out/fwd-nolse.txt" | cut -c1-150
  step fwd-lse 75 vkflex bench --suite seed --no-check --repeat 20 --return-lse
  grep -E "coopmat|portable" "$out/fwd-lse.txt" | cut -c1-150
  (cd "$out" && tar cf doc-lse.tar --exclude doc-lse.tar . 2>/dev/null && find . -type f ! -name doc-lse.tar -delete)
fi
if [ "$what" = next ]; then
  # What the next call runs (the eighteenth session's list), in priority order (DEADLINE=555 keeps
  # it in one call): every kernel's selftest under the validation layer (the NV extension) and
  # without it (the KHR one, where the planner now takes nvrh and the merge is one pass: neither
  # has run on a GPU as the planner's default), the decode suite beside PyTorch (issues 22 and 23 on
  # an H200), the decode suite with each dispatch's time and nvrh's residency (how long each
  # subgroup takes: the fixed cost beside the steps), the backward beside PyTorch (issue 20), the
  # dK/dV pass in two dispatches, the scalar kernel's splits, coopmat-generic's one-buffer pipeline.
  # On an H200 (H200=1) the backward's compare comes before the decode timings.
  # NEXT_REST=1: a second call on the same warm machine, after a first that ran out of time: the
  # steps from the backward's compare on (the selftests, the decode compare and the row blocks done).
  h200=${H200:-0}
  if [ "${NEXT_REST:-0}" != 1 ]; then
  VKFLEX_VALIDATE=1 step selftest-validated 150 vkflex selftest --kernel all
  step selftest-khr 150 vkflex selftest --kernel all
  grep -E "B operands|^(PASS|FAIL) +decode" "$out/selftest-khr.txt" | cut -c1-160
  torch_rule 120
  # document_causal's backward, 0.15x PyTorch on the H200 (twenty-first session) where causal is
  # 0.46x: each pass's time beside causal's.
  VKFLEX_PROFILE=1 step bwd-document 90 vkflex bench --suite seed --backward --no-check --cases document_causal,causal
  grep -E "backward|device time|flex_attention" "$out/bwd-document.txt" | cut -c1-180 | head -20
  # On an H200 the decode suite beside PyTorch (issues 22 and 23) comes first; elsewhere the row blocks.
  [ "$h200" = 1 ] && { step compare-decode 220 bash .device/on-device.sh compare --suite decode; tail -12 "$out/compare-decode.txt"; }
  # coopmat-generic with two row blocks a subgroup (GEN_RPW, nineteenth session, never run on a
  # GPU): its selftest under the layer, then beside the default 4x16 on full and causal.
  row_blocks 35 "${RPW_TILES:-default 4x16xr2 4x16xp1 2x16xr2 4x16xp1xr2}"
  # Where coopmat-generic's step goes (twentieth session): the planner's tiles on causal.
  gen_parts 25 "${PARTS_TILES:-default}" causal
  [ "$h200" != 1 ] && { step compare-decode 220 bash .device/on-device.sh compare --suite decode; tail -12 "$out/compare-decode.txt"; }
  fi
  if [ "$h200" = 1 ]; then
    step compare-backward 200 bash .device/on-device.sh compare --backward
    tail -14 "$out/compare-backward.txt"
  fi
  decode_times next-decode
  if [ "$h200" != 1 ]; then
    step compare-backward 200 bash .device/on-device.sh compare --backward
    tail -14 "$out/compare-backward.txt"
  fi
  # The dK/dV pass in two dispatches (k: half the accumulators each, so two workgroups an SM at
  # D = 128), untried since the owned rows left shared memory; beside the default in the same call.
  for t in default 8x32xp/8x32xpk; do
    [ "$t" = default ] && unset VKFLEX_BWD_TILES || export VKFLEX_BWD_TILES=$t
    VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1 step "bwd-${t//\//-}" 70 vkflex bench --suite seed --backward --no-check --cases causal
    grep -E 'backward|device time' "$out/bwd-${t//\//-}.txt" | sed "s|^|$t |" | cut -c1-180
  done
  unset VKFLEX_BWD_TILES
  DEADLINE=$((${DEADLINE:-100000} - SECONDS)) SPLIT_SWEEP=${SPLIT_SWEEP:-"decode_dense_32k:6 7 9;decode_long_128k:56 67"} bash "$0" splits
  VKFLEX_VALIDATE=1 VKFLEX_GENERIC_TILES=4x16xp1 step selftest-generic-p1 60 vkflex selftest --kernel coopmat-generic
  for t in 4x16 4x16xp1; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_KERNEL=coopmat-generic VKFLEX_GENERIC_TILES=$t step "next-generic-$t" 50 \
      vkflex bench --suite seed --no-check --cases full,causal
    grep -E "^ *(full|causal) " "$out/next-generic-$t.txt" | sed "s/^/$t /" | cut -c1-140
  done
  # At most 8 files come back from a call: everything in one archive.
  (cd "$out" && tar cf next.tar --exclude next.tar . 2>/dev/null && find . -type f ! -name next.tar -delete)
fi
if [ "$what" = regsm ]; then
  # coopmat-generic's register softmax (VKFLEX_GENERIC_SOFTMAX=registers, GEN_REGSM: the scores
  # read from their accumulators through an index matrix), written without a GPU: its selftest
  # under the validation layer (the NV extension) and without it (KHR), then the kernel with it
  # and without it beside coopmat-nv on four seed rows, with registers and each dispatch's time.
  VKFLEX_VALIDATE=1 VKFLEX_GENERIC_SOFTMAX=registers step selftest-generic-regsm-nv 60 vkflex selftest --kernel coopmat-generic
  VKFLEX_GENERIC_SOFTMAX=registers step selftest-generic-regsm-khr 60 vkflex selftest --kernel coopmat-generic
  for g in registers shared; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_KERNEL=coopmat-generic VKFLEX_GENERIC_SOFTMAX=$g step "regsm-$g" 70 \
      vkflex bench --suite seed --no-check --cases ${REGSM_CASES:-full,causal}
    grep -E "TFLOP|tflops|^ *(full|causal|alibi|softcap|sliding|document|prefix)" "$out/regsm-$g.txt" | sed "s/^/$g /" | cut -c1-160
    grep -E 'pipeline flex_attention_fwd_generic' "$out/regsm-$g.txt" | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*Shared Memory Size = ([0-9]+).*/   \1 registers, local \2, shared \3/' | sort -u | head -3
  done
  VKFLEX_KERNEL=coopmat-nv step regsm-nv 40 vkflex bench --suite seed --no-check --cases ${REGSM_CASES:-full,causal}
  grep -E "TFLOP|tflops|^ *(full|causal|alibi|softcap|sliding|document|prefix)" "$out/regsm-nv.txt" | sed "s/^/nv /" | cut -c1-160
fi
if [ "$what" = waves ]; then
  # The NVIDIA-layout split-KV kernel's split count, never swept: its one-subgroup workgroups run
  # about eight an SM (255 registers), while the default sizes splits for 16 a compute unit (two
  # waves of short splits). VKFLEX_DECODE_WAVES=w asks for 4w one-subgroup workgroups a compute unit.
  for t in ${WAVE_TILES:-nv nv2}; do
    for w in ${WAVES:-1 2 4}; do
      VKFLEX_PROFILE=1 VKFLEX_DECODE_WAVES=$w VKFLEX_DECODE_TILE=$t step "waves-$t-$w" 40 \
        vkflex bench --suite decode --no-check --cases ${WAVE_CASES:-specdec_4_of_8k,decode_mqa_32k}
      grep -E " (no|yes) |device time" "$out/waves-$t-$w.txt" | sed "s/^/$t w$w /" | cut -c1-160
    done
  done
fi
if [ "$what" = splits ]; then
  # The scalar split-KV kernel's split count per case (VKFLEX_DECODE_SPLITS), for a one-wave rule
  # like the NVIDIA-layout kernel's: its 128-invocation workgroups ran 3.1-3.7 an SM (H100), and
  # the four-a-compute-unit default gives decode_dense_32k 576 workgroups, more than a wave.
  # SPLIT_SWEEP: "case:n n n;case:n n" (default below), contiguous and paged rows, device times.
  sweep=${SPLIT_SWEEP:-"decode_dense_32k:5 6 7 9;decode_long_128k:40 49 56 66;decode_alibi_32k:5 6 7 9;decode_dense_4k:5 7 9;decode_sliding_4k_of_32k:5 7 9"}
  IFS=';' read -ra items <<< "$sweep"
  for it in "${items[@]}"; do
    c=${it%%:*}
    for n in ${it#*:}; do
      VKFLEX_PROFILE=1 VKFLEX_DECODE_SPLITS=$n step "splits-$c-$n" 30 vkflex bench --suite decode --no-check --cases "$c"
      grep -E " (no|yes) |device time" "$out/splits-$c-$n.txt" | sed "s/^/splits $n /" | cut -c1-160
      rm -f "$out/splits-$c-$n.txt"
    done
  done
fi
if [ "$what" = decode-nv ]; then
  # Under the validation layer (Debian 12's, older than VK_KHR_cooperative_matrix) the matrices go
  # through the NV extension, whose B operands nvr is not written for: nvr's selftest runs
  # without it, on the KHR extension the planner uses.
  VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=nv step selftest-split-kv-nv 60 vkflex selftest --kernel split-kv
  VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=nvs step selftest-split-kv-nvs 60 vkflex selftest --kernel split-kv
  VKFLEX_DECODE_TILE=nvrh step selftest-split-kv-nvrh 60 vkflex selftest --kernel split-kv
  # nv2 zeroes V through the B operand's layout, which differs between the two extensions: both.
  VKFLEX_VALIDATE=1 VKFLEX_DECODE_TILE=nv2 step selftest-split-kv-nv2-nv 60 vkflex selftest --kernel split-kv
  VKFLEX_DECODE_TILE=nv2 step selftest-split-kv-nv2-khr 60 vkflex selftest --kernel split-kv
  # The scalar kernel with its step loop not unrolled either (VKFLEX_DECODE_UNROLL=0).
  VKFLEX_VALIDATE=1 VKFLEX_DECODE_UNROLL=0 step selftest-split-kv-no-unroll 60 vkflex selftest --kernel split-kv
  VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_UNROLL=0 VKFLEX_DECODE_TILE=scalar step nv-scalar-no-unroll 60 vkflex bench --suite decode --no-check
  grep -E " (no|yes) " "$out/nv-scalar-no-unroll.txt" | sed "s/^/scalar, not unrolled /" | cut -c1-140
  for t in nv2 nv scalar nvs nvrs nvrh; do
    VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_TILE=$t step "nv-$t" 60 vkflex bench --suite decode --no-check
    grep -E " (no|yes) " "$out/nv-$t.txt" | sed "s/^/$t /" | cut -c1-140
    grep -E 'pipeline flex_attention_decode' "$out/nv-$t.txt" | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*Shared Memory Size = ([0-9]+).*/   \1 registers, local \2, shared \3/' | sort -u | head -2
  done
  VKFLEX_RESIDENCY=flex_attention_decode_nv VKFLEX_PROFILE=1 VKFLEX_DECODE_TILE=nv step res-nv 40 vkflex bench --suite decode --no-check --cases specdec_4_of_8k,decode_mqa_32k
  grep -E 'residency|device time' "$out/res-nv.txt" | cut -c1-200
fi
if [ "$what" = residency ]; then
  # How many workgroups of each kernel an SM runs at once (VKFLEX_RESIDENCY: every subgroup's SM
  # and clocks; with VKFLEX_PROFILE=1 the bench prints a "residency" line per pipeline), beside the
  # driver's register and shared-memory counts of the same pipelines: the forward and backward
  # through coopmat-nv (causal, D=64 and D=128), coopmat-generic, and the split-KV kernels (scalar,
  # mm, mm16, mm16x4) on the 16-row decode cases.
  export VKFLEX_RESIDENCY=all VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1
  step res-seed 90 vkflex bench --suite seed --backward --no-check --cases causal
  step res-generic 60 env VKFLEX_KERNEL=coopmat-generic vkflex bench --suite seed --no-check --cases causal
  for t in scalar mm mm16 mm16x4; do
    step "res-decode-$t" 40 env VKFLEX_DECODE_TILE=$t vkflex bench --suite decode --no-check --cases specdec_4_of_8k,decode_mqa_32k
  done
  for f in "$out"/res-*.txt; do
    echo "-- $(basename "$f" .txt)"
    grep -E '^(causal|specdec|decode)|device time|residency' "$f" | cut -c1-260
    grep -h 'Register Count' "$f" | sed -E 's/^.*pipeline ([a-z_]+)[^:]*:.*Register Count = ([0-9]+).*Shared Memory Size = ([0-9]+).*/   \1: \2 registers, shared \3 B/' | sort -u
  done
  unset VKFLEX_RESIDENCY VKFLEX_PROFILE VKFLEX_PIPELINE_STATS
fi
if [ "$what" = mm-parts ]; then
  # Where the split-KV matrix kernel's step goes: the kernel with one part taken out (results
  # wrong, --no-check), one workgroup a compute unit (16 splits of decode_mqa_32k: 128 workgroups)
  # and sixteen (256 splits). Variants are patched copies of Shaders/ (VKFLEX_SHADER_DIR).
  python3 - "$PWD/Shaders" /tmp/mm-parts <<'PY'
import os, sys
sys.path.insert(0, "tools"); import shader_variants
src, dst = sys.argv[1], sys.argv[2]
stage = "        MM_STAGE(Ks4, kb, KS4, D / 8, kn, lane, SG, K_UNIT)\n        MM_STAGE(Vs4, vb, VS4, DV / 8, kn, lane, SG, V_UNIT)"
soft = ("    sm_tile(M, L, alpha_); \\", "    [[unroll]] for (int k_ = 0; k_ < SM_RPL; ++k_) alpha_[k_] = 1.0; \\")
variants = {
    "no-loads": [("flex_attention_decode_mm.comp", stage, "")],
    "no-softmax": [("flex_mm_step.glsl",) + soft],
    "no-pv": [("flex_mm_step.glsl", "            O[nn_] = coopMatMulAddNV(PF[kk_], vf_, O[nn_]); \\", "            if (kk_ == 99) O[nn_] = coopMatMulAddNV(PF[kk_], vf_, O[nn_]); \\")],
    "no-qk": [("flex_mm_step.glsl", "            ACC = coopMatMulAddNV(QF[kk_], kt_, ACC); \\", "            if (kk_ == 99) ACC = coopMatMulAddNV(QF[kk_], kt_, ACC); \\")],
}
shader_variants.make(src, dst, variants, "mm-parts", once=False)
PY
  for v in base no-loads no-softmax no-pv no-qk; do
    [ "$v" = base ] && unset VKFLEX_SHADER_DIR || export VKFLEX_SHADER_DIR=/tmp/mm-parts/$v
    for sp in 16 256; do
      VKFLEX_PROFILE=1 VKFLEX_DECODE_SPLITS=$sp VKFLEX_DECODE_TILE=mm timeout 30 vkflex bench --suite decode --no-check --cases decode_mqa_32k > "$out/parts.txt" 2>&1
      echo "$v splits=$sp: $(grep -A1 ' no ' "$out/parts.txt" | grep 'device time' | cut -c25-100) $(grep -m1 -iE 'error' "$out/parts.txt" | cut -c1-120)"
    done
  done
  unset VKFLEX_SHADER_DIR
  rm -f "$out/parts.txt"
fi
if [ "$what" = nv-parts ]; then
  # Where the NVIDIA-layout split-KV kernel's step goes (nv2, the planner's): the kernel with its
  # K/V loads from memory replaced by loads from its shared tile (no-loads), or with its scores'
  # mods, mask and running maximum taken out (no-softmax); results wrong (--no-check), the
  # planner's splits. If no-loads is several times faster, the step waits on its memory path.
  python3 - "$PWD/Shaders" /tmp/nv-parts <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tools"))
import shader_variants
src, dst = sys.argv[1], sys.argv[2]
f = "flex_attention_decode_nv.comp"
loads = "        LOAD_KV(rowa, kfa, vfa)\n        LOAD_KV(rowb, kfb, vfb)\n"
shared = ("        [[unroll]] for (int kk = 0; kk < FD; ++kk) { coopMatLoadNV(kfa[kk], Ts4, uint(tb + 2 * kk), uint(TS4), true); coopMatLoadNV(kfb[kk], Ts4, uint(tb + 2 * kk + 1), uint(TS4), true); }\n"
          "        [[unroll]] for (int nn = 0; nn < FDV; ++nn) { coopMatLoadNV(vfa[nn], Ts4, uint(tb + 2 * nn), uint(TS4), false); coopMatLoadNV(vfb[nn], Ts4, uint(tb + 2 * nn + 1), uint(TS4), false); }\n")
soft = "        SCORE_CHUNK(sa, c0a, kna, cpa)\n        SCORE_CHUNK(sb, c0b, knb, cpb)\n        TAKE_MAX_SCORES()\n        LAZY_MAX()\n"
# k-rows: K's matrices loaded row-major from memory (wrong scores): whether the transposed load is the slow one.
krow = ("coopMatLoadNV(KF[kk], k_units, ks_ + uint(2 * kk), uint(p.k_sl / 8), true)", "coopMatLoadNV(KF[kk], k_units, ks_ + uint(2 * kk), uint(p.k_sl / 8), false)")
variants = {"no-loads": [(loads, shared)], "no-softmax": [(soft, "")], "neither": [(loads, shared), (soft, "")], "k-rows": [krow]}
shader_variants.write(src, dst, f, variants)
PY
  for v in base no-loads no-softmax neither k-rows; do
    [ "$v" = base ] && unset VKFLEX_SHADER_DIR || export VKFLEX_SHADER_DIR=/tmp/nv-parts/$v
    VKFLEX_PROFILE=1 VKFLEX_DECODE_TILE=nv2 step "nv-parts-$v" 40 vkflex bench --suite decode --no-check --cases ${PARTS_CASES:-specdec_4_of_8k,decode_mqa_32k,decode_dense_32k}
    grep -E " (no|yes) |device time" "$out/nv-parts-$v.txt" | sed "s/^/$v /" | cut -c1-160
  done
  unset VKFLEX_SHADER_DIR
  # nv2's machine code on speculative decoding (SASS=0: not), in sass-nv.tar: the step loop's
  # instructions by class (tools/nvidia-sass; nvdisasm there, zstd carried in .device/zstd).
  if [ "${SASS:-1}" = 1 ]; then
    export PATH=$PATH:/usr/local/cuda-13.0/bin:$PWD/.device/zstd
    rm -rf /tmp/sass-nv
    VKFLEX_CACHE_DIR=/tmp/sass-nv VKFLEX_DECODE_TILE=nv2 step nv-sass-run 40 vkflex bench --suite decode --no-check --cases specdec_4_of_8k
    step nv-sass 60 python3 tools/nvidia-sass/sass-dump.py /tmp/sass-nv/pipelines-*.bin "$out/sass-nv"
    head -20 "$out/nv-sass.txt"
    (cd "$out" && tar cf sass-nv.tar sass-nv && rm -rf sass-nv nv-sass-run.txt)
  fi
fi
if [ "$what" = nvr ]; then
  # The NVIDIA-layout split-KV kernel with word-by-word loads (nvr: DEC_REGLOAD) in the eighteenth
  # session's layout (DEC_COALESCED: one 16-byte load instruction reads whole sectors of each row)
  # and with two chunks a step (nvr2), beside nv2 (the planner's) and the old layout (-old, through
  # VKFLEX_SHADER_DIR): their selftests on the KHR extension (the validation layer's NV one has not
  # the B layout nvr is written for), then the three 16-row cases with each dispatch's time and the
  # registers, then nvr2's and nvrh's machine code (SASS=1) in sass-nvr.tar; all in nvr.tar.
  rm -rf /tmp/nvr-old && cp -r "$PWD/Shaders" /tmp/nvr-old
  sed -i 's/^#define DEC_COALESCED 1$/#define DEC_COALESCED 0/' /tmp/nvr-old/flex_attention_decode_nv.comp
  grep -q '^#define DEC_COALESCED 0$' /tmp/nvr-old/flex_attention_decode_nv.comp || echo "nvr: the old-layout patch no longer applies"
  for t in nvr2 nvrs nvrh; do
    VKFLEX_DECODE_TILE=$t step "nvr-selftest-$t" 40 vkflex selftest --kernel split-kv
  done
  for v in nv2 nvr2 nvrh nvrs nvr nvr2-old nvrh-old nvrs-old; do
    t=${v%-old}
    [ "$t" = "$v" ] && unset VKFLEX_SHADER_DIR || export VKFLEX_SHADER_DIR=/tmp/nvr-old
    VKFLEX_PROFILE=1 VKFLEX_PIPELINE_STATS=1 VKFLEX_DECODE_TILE=$t step "nvr-$v" 45 stdbuf -oL vkflex bench --suite decode --no-check --cases ${NVR_CASES:-specdec_4_of_8k,decode_mqa_32k,decode_dense_4k}
    grep -E " (no|yes) |device time" "$out/nvr-$v.txt" | sed "s/^/$v /" | cut -c1-150
    grep -E 'pipeline flex_attention_decode_nv' "$out/nvr-$v.txt" | sed -E 's/.*Register Count = ([0-9]+).*Local Memory Size = ([0-9]+).*/   \1 registers, local \2/' | sort -u | head -2
  done
  unset VKFLEX_SHADER_DIR
  if [ "${SASS:-1}" = 1 ]; then
    export PATH=$PATH:/usr/local/cuda-13.0/bin:$PWD/.device/zstd
    rm -rf /tmp/sass-nvr
    for t in nvr2 nvrh; do
      VKFLEX_CACHE_DIR=/tmp/sass-nvr/$t VKFLEX_DECODE_TILE=$t step nvr-sass-run 40 vkflex bench --suite decode --no-check --cases specdec_4_of_8k
      step "nvr-sass-$t" 60 python3 tools/nvidia-sass/sass-dump.py /tmp/sass-nvr/$t/pipelines-*.bin "$out/sass-nvr/$t"
      head -3 "$out/nvr-sass-$t.txt"
    done
    (cd "$out" && tar cf sass-nvr.tar sass-nvr && rm -rf sass-nvr nvr-sass-run.txt)
  fi
  (cd "$out" && tar cf nvr.tar --exclude nvr.tar --exclude sass-nvr.tar nvr-* 2>/dev/null && rm -f nvr-*)
fi
if [ "$what" = bwd ]; then
  step selftest-nv 150 vkflex selftest --kernel coopmat-nv
  grep -E '^(PASS|FAIL)  backward' "$out/selftest-nv.txt" | cut -c1-150
  for t in ${BWD_TILES:-default}; do
    [ "$t" = default ] && unset VKFLEX_BWD_TILES || export VKFLEX_BWD_TILES=$t
    # The driver's register and spill counts of the backward's matrix passes (stderr, same file).
    VKFLEX_PIPELINE_STATS=1 step "bench-bwd-$t" 150 vkflex bench --suite seed --backward --cases "${BWD_CASES:-causal,sliding_window_1024}"
    grep -E 'backward|rror' "$out/bench-bwd-$t.txt"
    grep -E 'pipeline flex_attention_bwd_(nv|mm)' "$out/bench-bwd-$t.txt" | sed -E 's/\[.*BWD_PASS=([0-9]).*D=([0-9]+).*\]/pass \1 D=\2/' | cut -c1-220
    local_mem "$out/bench-bwd-$t.txt"
  done
fi
date -u
