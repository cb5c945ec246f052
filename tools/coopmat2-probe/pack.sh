#!/usr/bin/env bash
# Packs the cooperative-matrix peak probe into .device/cm2 and writes .device/cm2.sh, which runs it
# on the GPU machine (after ../shared/device/prep.sh has put the Vulkan loader packages in .device/gl):
#   tools/coopmat2-probe/pack.sh && run: bash .device/cm2.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/.device/cm2
rm -rf "$out"; mkdir -p "$out"
gcc -O2 -o "$out/probe" "$here/probe.c" -lvulkan
# scope M N K invocations accumulators iterations smem
while read -r scope M N K inv nacc it sm; do
  name=${scope}_${M}x${N}x${K}_i${inv}_a${nacc}_s${sm}
  fl=$(python3 "$here/spv.py" "$out/$name.spv" "$scope" "$M" "$N" "$K" "$inv" "$nacc" "$it" "$sm")
  groups=$(python3 -c "
import math
per = $inv // 32 if '$scope' == 'subgroup' else 1
cap = (1 << 30) // (4 * $M * $N * $nacc * per)   # accumulators stored into a 1 GiB buffer
print(min(math.ceil(8e12 / $fl), cap))")        # about 8 TFLOP per dispatch
  echo "$name.spv $inv $fl $groups" >> "$out/list.txt"
done <<'LIST'
subgroup 16 16 16 128 4 10000 0
subgroup 16 16 16 128 8 5000 0
subgroup 16 16 16 128 4 10000 1
subgroup 16 16 16 128 8 5000 1
workgroup 64 64 16 128 1 10000 0
workgroup 128 128 16 128 1 4000 0
workgroup 128 128 32 256 1 2000 0
workgroup 128 256 32 256 1 1000 0
workgroup 64 64 16 128 1 10000 1
workgroup 128 128 16 128 1 4000 1
workgroup 128 128 32 256 1 2000 1
LIST
python3 "$here/nvtwin.py" "$out/nv_16x16x16_i128_a4_s0.spv" subgroup 16 16 16 128 4 10000 0
echo "nv_16x16x16_i128_a4_s0.spv 128 1310720000 6104" >> "$out/list.txt"
cat > "$root/.device/cm2.sh" <<'RUN'
#!/usr/bin/env bash
k=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for f in "$k"/gl/*.deb; do dpkg -x "$f" /; done; ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; [ -f "$icd" ] && export VK_DRIVER_FILES=$icd
cd "$k/cm2"; date -u
timeout 30 ./probe info
while read -r f inv fl g; do timeout 60 ./probe run "$f" "$inv" "$fl" "$g" 2>&1 | tail -2; done < list.txt
date -u
RUN
echo "packed $(wc -l < "$out/list.txt") kernels into $out; run: bash .device/cm2.sh"
