#!/usr/bin/env bash
# On a CUDA machine with ifrender installed: local-tiny and modes-tiny (8-bit T5) with a GPU share
# per stage in fp16; prints each run summary, including peak GPU memory per stage.
# Asserts every stage ran on CUDA and prints the run summary with busy seconds per stage.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q -s -m gpu tests/scenarios/test_gpu.py
