#!/usr/bin/env bash
# Packs the release binary of an earlier commit beside the current one, for an A/B on the GPU
# machine (tools/device-ab.sh): run ../shared/device/prep.sh first (it packs the current build),
# then, from the project root,
#   tools/pack-before.sh REV          # e.g. the commit before a refactor
# which builds REV in a worktree (static Swift runtime, stripped) into .device/vkflex-before.gz.
set -euo pipefail
rev=${1:?usage: tools/pack-before.sh REV}
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -d .device ] || { echo "run ../shared/device/prep.sh first" >&2; exit 1; }
work=$(mktemp -d)
trap 'git worktree remove --force "$work/src" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/src" "$rev" >/dev/null
# PACK_SWIFT_FLAGS: extra flags for an old revision this compiler no longer builds as it is, e.g.
# "-Xswiftc -Xfrontend -Xswiftc -enable-copy-propagation=false" (Swift 6.3.1 crashes in
# CopyPropagation on 91f6cce's Attend.swift; host code only, the kernels' SPIR-V is the same).
flags=(${PACK_SWIFT_FLAGS:-})
(cd "$work/src" && swift build -c release --static-swift-stdlib "${flags[@]}" --product vkflex)
bin="$(cd "$work/src" && swift build -c release --static-swift-stdlib "${flags[@]}" --show-bin-path)/vkflex"
strip -o .device/vkflex-before "$bin"
gzip -f .device/vkflex-before
echo "packed $(git rev-parse --short "$rev") into .device/vkflex-before.gz"
