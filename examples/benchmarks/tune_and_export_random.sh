#!/usr/bin/env bash
# The main job on a GPU for a Llama-3-8B-shaped model with random bf16 weights (speed only: timings do not depend on
# the weights' values), so that the model card's speed section comes from measurements made in the same run.
#
#   [SHAPE=llama3-8b] examples/benchmarks/tune_and_export_random.sh TOKENIZER_DIR WORK_DIR [tune-and-export options]
#
# (default options: --format hf)
#
# SHAPE (environment, default llama3-8b): any name of rtexport.models.shapes.SHAPES, e.g. smollm2-135m for a run of
# the whole job (--format both) in a few minutes.
# TOKENIZER_DIR: any tokenizer whose ids fit the 128,256-entry vocabulary (the GPU machine has no Hub access; we carry
# SmolLM2's). The model folder is written once (WORK_DIR/SHAPE-random; 16 GB for llama3-8b); the run folder is WORK_DIR/run and
# resumes if the job is interrupted (rerun the same command).
set -euo pipefail
tok=$1; work=$2; shift 2
shape=${SHAPE:-llama3-8b}
model="$work/$shape-random"
if [ ! -f "$model/config.json" ]; then
  python3 - "$tok" "$model" "$shape" <<'PY'
import sys, time
from transformers import AutoTokenizer
from rtexport.models.shapes import random_model

t = time.perf_counter()
import torch
model = random_model(sys.argv[3], device="cuda" if torch.cuda.is_available() else "cpu")
model.save_pretrained(sys.argv[2] + ".partial")
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2] + ".partial")
import os; os.replace(sys.argv[2] + ".partial", sys.argv[2])
print(f"wrote {sys.argv[2]} in {time.perf_counter() - t:.1f} s", flush=True)
PY
fi
[ $# -gt 0 ] || set -- --format hf
python3 -m rtexport tune-and-export "$model" --target attn --output "$work/run" "$@"
