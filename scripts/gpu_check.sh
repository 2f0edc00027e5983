#!/usr/bin/env bash
# The GPU check, in one go (under 8 minutes on one H100): QLoRA steps on random-weight models of the phi3, mistral
# and llama3 recipes' real architectures and sizes (tokens/s and peak GPU memory beside `tunebook plan`'s estimate),
# then one DeepSpeed ZeRO-2 and one FSDP launch on the one GPU. Writes bench/gpu_check.json.
#   bash scripts/gpu_check.sh            # on a GPU machine with the project installed (make setup)
#   bash scripts/gpu_check.sh --tiny     # tiny configs: a smoke run on any machine (the tests run it on CPU)
#   bash scripts/gpu_check.sh --bench    # also `tunebook bench --gpu`: tunebook's QLoRA training vs plain Trainer + PEFT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m tunebook.gpu_check "$@"
