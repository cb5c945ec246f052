#!/usr/bin/env bash
# Installs the Debian packages vkflex needs when they are missing (as root, through apt-get), or
# prints the exact command to run when it cannot; installs NumPy (for the tests) through pip.
set -euo pipefail
packages=(libvulkan-dev glslang-dev glslang-tools libshaderc-dev spirv-tools glslc
          mesa-vulkan-drivers vulkan-validationlayers vulkan-tools)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The tests compare the expression language and `vkflex attend` with NumPy.
if command -v python3 >/dev/null && ! python3 -c 'import numpy' 2>/dev/null; then
  echo "installing numpy for the tests (python3 -m pip install numpy)"
  python3 -m pip install -q numpy || echo "could not install numpy: run python3 -m pip install numpy" >&2
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "vkflex needs these Debian packages; run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
