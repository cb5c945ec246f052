#!/usr/bin/env bash
# On the GPU machine, from the repository root, after ../shared/device/prep.sh packed .device/:
#   bash tools/device-first-call.sh
# Where a first call's time goes (`compile_ms`: shaderc + spirv-opt, `pipeline_ms`:
# vkCreateComputePipelines), cold (new vkflex cache folder and a new NVIDIA shader cache) and warm
# (a second process on both), for each SPIR-V optimizer recipe and both kernels; then the
# cooperative-matrix kernel's speed under each recipe. The table in docs/performance.md ("First
# call") came from this loop. About 3 minutes.
set -u
kit=.device
out=${OUT:-/tmp}
fields() { python3 -c "import json,sys; r=json.loads(open(sys.argv[1]).readline()); print(*(f'{k}={r.get(k)}' for k in ('kernel','first_call_ms','compile_ms','pipeline_ms','rel_err')))" "$1"; }
for opt in full unroll fast 0; do
  for kern in coopmat portable; do
    d=$(mktemp -d); g=$(mktemp -d)
    for run in cold warm; do
      f=$out/first-$kern-opt$opt-$run.jsonl
      __GL_SHADER_DISK_CACHE_PATH=$g VKFLEX_SPIRV_OPT=$opt VKFLEX_KERNEL=$kern VKFLEX_CACHE_DIR=$d timeout 60 bash $kit/on-device.sh vkflex bench --b 1 --h 1 --s 512 --d 64 \
        --mask-mod "q_idx >= kv_idx" --score-mod "20 * tanh(score / 20)" --json "$f" > /dev/null 2>&1
      echo "VKFLEX_SPIRV_OPT=$opt $kern $run: $(fields "$f")"
    done
  done
done
for opt in full unroll fast 0; do
  echo "## kernel speed, VKFLEX_SPIRV_OPT=$opt"
  VKFLEX_SPIRV_OPT=$opt timeout 120 bash $kit/on-device.sh vkflex bench --suite seed --cases causal,softcap20_causal --repeat 5 --no-check 2>&1 | grep -E "^causal|^softcap"
done
