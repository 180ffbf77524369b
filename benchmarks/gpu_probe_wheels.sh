#!/usr/bin/env bash
# The wheels benchmarks/gpu_probe.py needs on a GPU machine that has torch, transformers,
# accelerate, safetensors, pillow and pyarrow but not diffusers or pydantic: into .whl/ (ignored
# by git), for Python 3.12 on x86-64, at the versions this project is tested with. There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site python3 benchmarks/gpu_probe.py
set -euo pipefail
cd "$(dirname "$0")/.."
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
for name in diffusers pydantic pydantic_core annotated_types typing_inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$(version "$name")"
done
du -sh .whl
