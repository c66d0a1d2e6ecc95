#!/usr/bin/env bash
# Wheels for an offline x86-64 machine with Python 3.12 that already holds torch, triton and transformers
# (the lent GPU machines; a 910B node with CANN's torch is the same case): this project as a wheel plus
# every other install requirement the target lacks, in one folder. There:
#   python3 -m pip install --no-index --find-links WHEELHOUSE replay-megatron
# Versions are the ones installed here (the ones the tests ran with), so run it from the project's venv.
#   tools/wheelhouse.sh [OUT_DIR=wheelhouse] [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheelhouse}
py=${2:-3.12}
# What such a machine lacks: megatron-core (compiled per Python), pydantic and its own requirements, and
# versions of typing-extensions / packaging that megatron-core and pydantic require.
packages=(megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions packaging)
pins=()
for name in "${packages[@]}"; do
  version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
    echo "wheelhouse.sh: $name is not installed in $(command -v python); run it from the project's venv" >&2
    exit 2
  }
  pins+=("$name==$version")
done
rm -rf "$out" && mkdir -p "$out"
python -m pip wheel -q --no-deps --no-build-isolation -w "$out" .
platforms=()
for n in 39 35 34 31 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$out" "${pins[@]}"
echo "wheelhouse $out (Python $py, x86-64):"
ls -1 "$out"
du -sh "$out"
