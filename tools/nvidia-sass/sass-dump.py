#!/usr/bin/env python3
"""SASS of the pipelines in a vkflex pipeline cache, on an NVIDIA machine.

NVIDIA's Vulkan driver gives no internal representations through
VK_KHR_pipeline_executable_properties, but vkGetPipelineCacheData (which vkflex saves as
$VKFLEX_CACHE_DIR/pipelines-10de-*.bin) holds each pipeline's machine code: zstd frames, each
an "NVDANVVMNVuc" container whose header gives the code's offset (u32 #20, counted from byte 8)
and size (u32 #19). The code is raw instruction words, which `nvdisasm --binary SM90` reads.

    VKFLEX_CACHE_DIR=/tmp/c vkflex bench ...        # builds and saves the pipelines
    python3 tools/nvidia-sass/sass-dump.py /tmp/c/pipelines-10de-*.bin OUTDIR [SM90]

Writes OUTDIR/pipelineN.sass (one per pipeline) and prints, per pipeline, its size and counts
of the instruction classes that matter for the attention kernels (HMMA, LDSM, LDS/STS, LDG, BAR,
MUFU, SHFL, local-memory spills). Needs the `zstd` command (or the `zstandard` module) and
`nvdisasm` (CUDA toolkit, or the copy Triton ships) on PATH or in NVDISASM.
"""
import collections, os, re, shutil, struct, subprocess, sys


def frames(blob):
    """Offsets of zstd frames (magic 28 b5 2f fd)."""
    i = blob.find(b"\x28\xb5\x2f\xfd")
    while i >= 0:
        yield i
        i = blob.find(b"\x28\xb5\x2f\xfd", i + 4)


def zstd_decompress(data):
    try:
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except ImportError:
        pass
    # The CLI decodes the first frame, then complains about the bytes after it: keep stdout.
    r = subprocess.run(["zstd", "-d", "-c"], input=data, capture_output=True)
    return r.stdout


def code_of(container):
    if not container.startswith(b"NVDANVVMNVuc"):
        return None
    h = struct.unpack_from("<24I", container, 0)
    size, off = h[19], h[20] + 8
    if off + size > len(container) or size % 16:
        return None
    return container[off:off + size]


def nvdisasm():
    for c in [os.environ.get("NVDISASM"), shutil.which("nvdisasm"), "/usr/local/cuda/bin/nvdisasm"]:
        if c and os.path.exists(c):
            return c
    try:
        import triton
        c = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        if os.path.exists(c):
            return c
    except ImportError:
        pass
    return None


CLASSES = [("HMMA", r"\bHMMA\b"), ("LDSM", r"\bLDSM\b"), ("LDS", r"\bLDS\b"), ("STS", r"\bSTS\b"),
           ("LDG", r"\bLDG\b"), ("STG", r"\bSTG\b"), ("BAR", r"\bBAR\b"), ("MUFU", r"\bMUFU\b"),
           ("SHFL", r"\bSHFL\b"), ("VOTE", r"\bVOTE\b"), ("LDL/STL", r"\b(LDL|STL)\b"),
           ("FFMA", r"\bFFMA\b"), ("FMUL", r"\bFMUL\b"), ("FADD", r"\bFADD\b"), ("FMNMX", r"\bFMNMX\b"),
           ("F2FP", r"\bF2FP\b"), ("IMAD", r"\bIMAD\b"), ("ISETP", r"\bISETP\b"), ("BRA", r"\bBRA\b"),
           ("MOV", r"\bMOV\b"), ("MOVM", r"\bMOVM\b"), ("PRMT", r"\bPRMT\b")]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    arch = sys.argv[3] if len(sys.argv) > 3 else "SM90"
    os.makedirs(out, exist_ok=True)
    blob = open(src, "rb").read()
    dis = nvdisasm()
    n = 0
    for at in frames(blob):
        code = code_of(zstd_decompress(blob[at:]))
        if code is None:
            continue
        raw = os.path.join(out, f"pipeline{n}.bin")
        open(raw, "wb").write(code)
        line = f"pipeline{n}: {len(code)} bytes, {len(code) // 16} instruction words"
        if dis:
            r = subprocess.run([dis, "--binary", arch, raw], capture_output=True, text=True)
            text = r.stdout + r.stderr
            open(os.path.join(out, f"pipeline{n}.sass"), "w").write(text)
            counts = collections.Counter()
            for l in text.splitlines():
                for name, pat in CLASSES:
                    if re.search(pat, l):
                        counts[name] += 1
            line += "; " + " ".join(f"{k}={counts[k]}" for k, _ in CLASSES if counts[k])
        print(line)
        n += 1
    if not dis:
        print("nvdisasm not found: raw code written, not disassembled")


if __name__ == "__main__":
    main()
