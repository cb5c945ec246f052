"""Copies of Shaders/ with one template patched, for timing a kernel with a part changed or taken
out (tools/gpu-checks.sh: nv-parts, mqa_parts), read through VKFLEX_SHADER_DIR."""
import os
import shutil
import sys


def write(src, dst, name, variants):
    """For each variant (name -> [(old, new), ...]) a copy of `src` under `dst`/variant with the
    edits applied to template `name`; stops with a message when an edit no longer applies."""
    for variant, edits in variants.items():
        d = os.path.join(dst, variant)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        path = os.path.join(d, name)
        with open(path) as f:
            text = f.read()
        for old, new in edits:
            if old not in text:
                sys.exit(f"{variant}: the patch no longer applies to {name}")
            text = text.replace(old, new)
        with open(path, "w") as f:
            f.write(text)
