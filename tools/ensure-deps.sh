#!/usr/bin/env bash
# Installs the Debian packages vkflex needs when they are missing (as root, through apt-get), or
# prints the exact command to run when it cannot.
set -euo pipefail
packages=(libvulkan-dev glslang-dev glslang-tools libshaderc-dev spirv-tools glslc
          mesa-vulkan-drivers vulkan-validationlayers vulkan-tools)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
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
