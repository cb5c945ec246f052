#!/usr/bin/env bash
# Checks that another package can depend on vkflex by version: tags a clone of this repository,
# creates a package that depends on it by URL and version, builds it and runs a kernel.
#   tools/check-dependent.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/vkflex"
git -C "$work/vkflex" tag 0.1.0
mkdir -p "$work/consumer/Sources/consumer"
cat > "$work/consumer/Package.swift" <<SWIFT
// swift-tools-version:6.0
import PackageDescription
let package = Package(
    name: "consumer",
    dependencies: [.package(url: "file://$work/vkflex", from: "0.1.0")],
    targets: [.executableTarget(name: "consumer", dependencies: [.product(name: "VKFlex", package: "vkflex")])]
)
SWIFT
cat > "$work/consumer/Sources/consumer/main.swift" <<'SWIFT'
import VKFlex

let device = try Device.default()
let (S, D) = (64, 16)
let values = (0..<(S * D)).map { Float(($0 * 37) % 101) / 50 - 1 }
let q = try device.tensor(values, shape: [1, 1, S, D])
let mask = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: S, kvLen: S, device: device, blockSize: 16)
let out = try flexAttention(q, q, q, scoreMod: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, blockMask: mask).output
let ref = try flexAttentionReference(q, q, q, scoreMod: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, blockMask: mask)
let err = relativeL2Error(try out.toArray(), ref.output)
print("consumer ran flexAttention on \(device.capabilities.name): relative error \(err)")
guard err < 1e-4 else { fatalError("wrong result") }
SWIFT
cd "$work/consumer"
swift build -c release 2>&1 | tail -3
"$(swift build -c release --show-bin-path)/consumer"
