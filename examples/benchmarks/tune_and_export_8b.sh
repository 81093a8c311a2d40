#!/usr/bin/env bash
# The main job on a GPU for a Llama-3-8B-shaped model with random bf16 weights (speed only: timings do not depend on
# the weights' values), so that the model card's speed section comes from measurements made in the same run.
#
#   examples/benchmarks/tune_and_export_8b.sh TOKENIZER_DIR WORK_DIR [more tune-and-export options]
#
# TOKENIZER_DIR: any tokenizer whose ids fit the 128,256-entry vocabulary (the GPU machine has no Hub access; we carry
# SmolLM2's). The model folder is written once (WORK_DIR/llama3-8b-random, 16 GB); the run folder is WORK_DIR/run and
# resumes if the job is interrupted (rerun the same command).
set -euo pipefail
tok=$1; work=$2; shift 2
model="$work/llama3-8b-random"
if [ ! -f "$model/config.json" ]; then
  python3 - "$tok" "$model" <<'PY'
import sys, time
from transformers import AutoTokenizer
from rtexport.models.shapes import random_model

t = time.perf_counter()
model = random_model("llama3-8b", device="cuda")
model.save_pretrained(sys.argv[2] + ".partial")
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2] + ".partial")
import os; os.replace(sys.argv[2] + ".partial", sys.argv[2])
print(f"wrote {sys.argv[2]} in {time.perf_counter() - t:.1f} s", flush=True)
PY
fi
python3 -m rtexport tune-and-export "$model" --target attn --format hf --output "$work/run" "$@"
