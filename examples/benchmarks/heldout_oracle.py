"""How good can a static skip plan be on the held-out text itself? A bound for the plan-quality comparison.

Runs the greedy loss search (``rtexport.planning.greedy_loss_search``) on the *held-out* blocks, the text the plans
are judged on. The plan it finds has seen the test text, so it is a strong reference for methods that choose on other
text; it is greedy, not an exhaustive optimum, so a better plan may exist. Prints the removal order with the held-out
perplexity after each removal.

    python examples/benchmarks/heldout_oracle.py --layers 1-28 --skip 8 --out oracle.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rtexport.evaluation.quality import perplexity
from rtexport.models.loading import load_model
from rtexport.planning import greedy_loss_search
from rtexport.routing.config import parse_layers
from rtexport.tuning.data import load_blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--layers", nargs="+", default=["1-28", "8-28"], help="candidate sets to search")
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heldout-blocks", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="oracle.json")
    args = ap.parse_args()
    loaded = load_model(args.model, dtype=args.dtype)
    n = loaded.model.config.num_hidden_layers
    heldout, _ = load_blocks(loaded.tokenizer, None, split="heldout", seq_len=args.seq_len, max_blocks=args.heldout_blocks)
    result = {"model": args.model, "skip": args.skip, "heldout_blocks": int(heldout.shape[0]), "seq_len": args.seq_len,
              "base_perplexity": perplexity(loaded.model, heldout, batch_size=args.batch_size, progress=False)}
    print(f"base perplexity {result['base_perplexity']:.3f}", flush=True)
    for layers in args.layers:
        t0 = time.perf_counter()
        cand = parse_layers(layers, n)
        removal = greedy_loss_search(loaded.model, heldout, cand, args.skip, batch_size=args.batch_size, progress=True)
        result[layers] = {"removal": removal, "skip": sorted(layer for layer, _ in removal),
                          "perplexity": removal[-1][1], "seconds": time.perf_counter() - t0}
        print(f"{layers}: skip {result[layers]['skip']} held-out perplexity {removal[-1][1]:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
