#!/usr/bin/env bash
# Fetch the wheels that bench/gpu.sh installs on a GPU host which has torch but none of the other model
# libraries and no package index (run this where PyPI is reachable; the host is x86-64 with CPython 3.12
# unless GPU_PYTHON says otherwise). Versions are the tested ones, from docker/constraints.txt.
#
#     bench/gpu-wheels.sh [DEST]        # default .whl/ (keep it out of git: /.whl/ in .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python_version=${GPU_PYTHON:-3.12}

# What the benchmarks import that such a host lacks (or has at an untested version), and what those need.
names=(diffusers transformers open_clip_torch clip-interrogator aiosqlite ftfy wcwidth importlib_metadata lazy-importer regex timm compel pyparsing)

pins=()
for name in "${names[@]}"; do
  # Package names compare case-insensitively, with '-', '_' and '.' alike.
  pin=$(awk -v want="$name" -F'==' '
    function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s }
    NF == 2 && norm($1) == norm(want) { print; exit }' docker/constraints.txt)
  [[ -n $pin ]] || { echo "gpu-wheels: $name is not pinned in docker/constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done

rm -rf "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
  --python-version "$python_version" --implementation cp --abi "cp${python_version/./}" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any "${pins[@]}"
ls "$dest"
du -sh "$dest"
