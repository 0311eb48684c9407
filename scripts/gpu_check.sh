#!/usr/bin/env bash
# One-shot GPU check (docs/trtllm-checkpoint.md, "GPU check"): runs every check adaskip can only do on an NVIDIA GPU
# and writes one JSON report. On a machine without a GPU each check is skipped with its reason.
#   scripts/gpu_check.sh [REPORT.json] [--model smollm2-135m] [--only CHECK ...]
# PYTHON selects the interpreter (default: python3 with adaskip importable). The script keeps a 570 s budget
# (--budget) and always writes its report; the timeout below is only a last resort.
set -euo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu_check_report.json}"
[[ $# -gt 0 ]] && shift
exec timeout 630 "${PYTHON:-python3}" scripts/gpu_check.py --report "$report" "$@"
