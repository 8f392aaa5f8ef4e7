#!/usr/bin/env bash
# The one-shot GPU check (issue 19): one command, under 8 minutes on one GPU, one markdown table.
# Runs from a checkout without installing jaxnets; extra arguments go to the script, e.g.
#   bash benchmarks/gpu.sh --output gpu.md --json gpu.json
# What it measures and why: python -m jaxnets.benchmark --suite gpu --help (jaxnets/benchmark/gpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m jaxnets.benchmark --suite gpu "$@"
