"""Patched copies of Shaders/ for tools/gpu-checks.sh's part-by-part timings (VKFLEX_SHADER_DIR)."""
import os
import shutil
import sys


def make(src, dst, variants, what, once=True):
    """variants: {name: [(file, old, new), ...]}; each copy at dst/name, each `old` replaced by
    `new` (found other than once — with once=False, not found — stops the script, naming WHAT and
    the variant)."""
    for name, edits in variants.items():
        d = os.path.join(dst, name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        for f, old, new in edits:
            p = os.path.join(d, f)
            s = open(p).read()
            if s.count(old) != 1 if once else old not in s:
                sys.exit(f"{what} {name}: the patch no longer applies to {f}")
            open(p, "w").write(s.replace(old, new))
