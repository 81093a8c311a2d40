"""The ``ort-gpu`` package: a folder someone can copy to a GPU machine and run with ONNX Runtime.

Contents: ``model.onnx`` + ``model.onnx.data``, the tokenizer files, ``export_info.json``, ``genai_config.json``
(static graphs: ONNX Runtime GenAI runs them), ``run_ort.py`` (a standalone greedy runner: onnxruntime on
CUDAExecutionProvider with IO binding, CPU fallback), ``parity_report.json`` (the validation this graph passed) and
a ``README.md`` that says how to run it and what was measured.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ArtifactMismatch
from ..fsutil import atomic_directory, read_json, write_json_atomic, write_text_atomic
from .export import DATA_NAME, GRAPH_NAME, INFO_NAME, check_graph, load_export_info, make_readable
from .genai import CONFIG_NAME as GENAI_CONFIG, write_genai_config

RUNNER_NAME = "run_ort.py"
REPORT_NAME = "parity_report.json"
RUNNER_TEMPLATE = "run_ort.py.j2"


def runtime_source() -> str:
    """``runtime.py`` without its module docstring and ``__future__`` import (the runner script has its own)."""
    path = Path(__file__).with_name("runtime.py")
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    lines = text.splitlines()
    drop: set[int] = set()
    for node in tree.body:
        is_doc = isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
            and isinstance(node.value.value, str)
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if is_doc or is_future:
            drop.update(range(node.lineno - 1, node.end_lineno))
        else:
            break
    return "\n".join(line for n, line in enumerate(lines) if n not in drop).strip() + "\n"


def _templates_dir() -> Path:
    """The shipped templates (``rtexport.templates`` in a wheel, ``templates/`` in a source checkout)."""
    try:
        import importlib.resources

        ref = importlib.resources.files("rtexport.templates")
        if (ref / RUNNER_TEMPLATE).is_file():
            return Path(str(ref))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "templates"


def render_runner(info: dict[str, Any]) -> str:
    import jinja2

    from .. import __version__

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_templates_dir())), keep_trailing_newline=True,
                             autoescape=False)
    text = env.get_template(RUNNER_TEMPLATE).render(
        model_id=info["model"]["source"].get("model_id", "the model"),
        mode=info["mode"],
        dtype=info["dtype"],
        version=__version__,
        runtime_source=runtime_source(),
    )
    compile(text, RUNNER_NAME, "exec")  # a syntax error here is a bug in the template
    return text


README_TEMPLATE = """# {{ model_id }}: {{ mode }} ONNX graph ({{ dtype }}) for ONNX Runtime

Made by rtexport {{ version }} from `{{ model_id }}`{% if revision %} (revision `{{ revision }}`){% endif %}.
{% if mode == "static" -%}
The attention of {{ skipped|length }} of {{ num_layers }} layers is removed (layers {{ ranges(skipped) }}):
those layers have no attention weights and no KV cache in this graph. KV inputs exist for layers
{{ ranges(kv_layers) }}.
{%- else -%}
Every routed block (target `{{ target }}`, layers {{ ranges(routed) }}) sits in an ONNX `If`: the routers decide
per sequence at prefill whether each block runs, and that decision holds for the whole generation.
{%- endif %}

## Files

| file | what |
| --- | --- |
| `model.onnx`, `model.onnx.data` | the graph (opset {{ opset }}) and its weights ({{ data_mb }} MB) |
{% if phase_graphs %}| `prefill.onnx`, `decode.onnx`, `phase_graphs.json` | the gated graph's two phases as graphs of their own, reading the same weights file (below) |
{% endif %}| tokenizer files | the tokenizer, as saved by transformers |
{% if genai %}| `genai_config.json` | ONNX Runtime GenAI configuration (CUDA) |
{% endif %}| `run_ort.py` | a standalone runner: greedy decoding with onnxruntime, IO binding on CUDA, CPU fallback |
| `parity_report.json` | PyTorch against ONNX Runtime on the same inputs (below) |
| `export_info.json` | what made the graph: settings, layout, versions |

## Run it

```bash
pip install onnxruntime-gpu numpy tokenizers     # onnxruntime on a machine without a GPU
python run_ort.py --prompt "The capital of France is" --max-new-tokens 32
python run_ort.py --prompt "First prompt" --prompt "A second, longer prompt" --cpu
```
{% if genai %}
With ONNX Runtime GenAI (0.12.2 or later, which finds the layers that have KV inputs):

```python
import onnxruntime_genai as og
model = og.Model(".")            # genai_config.json asks for CUDA; og.Config(".").clear_providers() for CPU
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("The capital of France is"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```
{% elif attention == "gqa" %}
### Driving the GroupQueryAttention graph yourself

Each layer's attention is one ONNX Runtime `GroupQueryAttention` node (domain `com.microsoft`: ONNX Runtime only)
on a preallocated cache. Every `past_key_values.{i}.key|value` is a buffer (batch, {{ kv_heads }}, capacity,
{{ head_dim }}) as long as the whole generation; bind each `present.{i}.key|value` to the same buffer and the node
writes the step's K/V into it. Each sequence's tokens are packed from slot 0 of its rows, so a batched prompt is
right-padded. `attention_mask` marks, per sequence, the slots that hold its tokens (this step's included): at the
prompt it is as wide as the prompt; at a decode step it is as wide as the buffers, so that every decode step has the
same shapes and `run_ort.py` (class `OrtCausalLM`, `cuda_graph=True`) can have ONNX Runtime capture it once as a CUDA
graph and replay it. The graph derives the node's `seqlens_k` (filled slots - 1) and `total_sequence_length` (the
mask's width) from it. After the prompt, a step of more than one token takes batch 1. `logits_positions` names each
sequence's last real token. `OrtCausalLM` packs a left-padded batch itself and returns logits in the caller's layout.
{% elif kv_cache == "preallocated" %}
### Driving the preallocated-cache graph yourself

Every `past_key_values.{i}.key|value` is a buffer (batch, {{ kv_heads }}, capacity, {{ head_dim }}) as long as the
whole generation; bind each `present.{i}.key|value` to the same buffer, and the graph writes the step's K/V into it
in place (ONNX `TensorScatter`, opset 24). Per step: `attention_mask` is (batch, capacity), 1 for the slots that hold
a real token (this step's included), 0 for padding and for slots not yet written; `cache_position` (T,) int64 lists
the slots this step writes (prefill: 0…T-1, then one slot per step). A decode step has the same shapes and buffers
at every step, so `run_ort.py` (class `OrtCausalLM`, `cuda_graph=True`) has ONNX Runtime capture it once as a CUDA
graph and replay it (provider option `enable_cuda_graph`, run option `gpu_graph_id`, prefill with `-1`). ONNX
Runtime GenAI feeds no `cache_position`, so this package has no `genai_config.json`.
{% else %}
### Driving the gated graph yourself

Inputs beyond the usual `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`:
`routing_decisions` (batch, {{ routed|length }}) bool and one `run_layer.{i}` () bool per routed layer; outputs beyond
`logits` and `present.{i}.key|value`: `decisions` (batch, {{ routed|length }}) bool.

1. Prefill: empty caches, `routing_decisions` all true (a false entry forces that sequence's layer off), every
   `run_layer.{i}` true (not read at prefill). The graph's routers decide per sequence and return `decisions`.
{%- if prefill_always %}
   Layers {{ ranges(prefill_always) }} (those the routers run for nearly every sequence) have no `If` at prefill:
   they run for the batch, masked per sequence, so their `present` is not empty even when no sequence runs them.
{%- endif %}
2. Decode steps: feed `decisions` back as `routing_decisions`; set `run_layer.{i}` = any sequence runs layer `i`,
   bound as a CPU tensor (ONNX Runtime's CUDA `If` reads its condition on the host: no device-to-host copy is needed);
   {% if target != "mlp" %}give layers that no sequence runs an empty cache (batch, kv_heads, 0, head_dim) and drop their
   `present`.{% else %}every layer's attention runs, so every cache grows as usual.{% endif %}

`run_ort.py` does exactly this (class `OrtCausalLM`). ONNX Runtime GenAI's generate loop does not feed these
routing inputs, so this package has no `genai_config.json`.
{% if phase_graphs %}
`model.onnx` serves both steps: its decoder sits twice inside one `If` on "is this a prefill" (no cache yet), and
ONNX Runtime runs a graph inside an `If` at a higher cost per node. `prefill.onnx` and `decode.onnx` are that `If`'s
two branches as graphs of their own: same inputs, outputs and weights file, one `If` per routed block each{% if prefill_always %} (`prefill.onnx`: but layers {{ ranges(prefill_always) }}){% endif %}. Run the
prompt through `prefill.onnx` and every later step through `decode.onnx` (on an H200, Llama-3-8B shape, decode steps
1-5% faster than through `model.onnx`). `run_ort.py` does so on CUDA, with two sessions given the same weight
tensors: it loads each weight once (`phase_graphs.json` says where it lies in `model.onnx.data`) and hands it to both
sessions through `SessionOptions.add_initializer`, so the two sessions hold one copy of the weights on the GPU (on an
H200, a Llama-3.2-1B-shaped export: the same device memory as `model.onnx` alone, 3220 MiB against 6296 when each
session loads its own). On the CPU it runs `model.onnx` alone.
{% endif %}
{% endif %}
## Validation

PyTorch against ONNX Runtime ({{ report.providers|join(", ") }}) on {{ report.sequences }} sequences, batched
with padding ({{ report.real_tokens }} real tokens), and greedy decoding for {{ report.steps }} steps through the KV
cache:

| check | value | tolerance | result |
| --- | --- | --- | --- |
{% for c in report.checks -%}
| {{ c.name }} | {{ fmt(c.value) }} | {{ ">=" if c.higher_is_better else "<=" }} {{ fmt(c.tolerance) }} | {{ "pass" if c.passed else "FAIL" }} |
{% endfor %}
Perplexity on those sequences: PyTorch {{ "%.4f"|format(report.details.perplexity_torch) }}, ONNX Runtime
{{ "%.4f"|format(report.details.perplexity_onnx) }}.

## Layout

- inputs: `input_ids`, `attention_mask`, `position_ids` (int64), `past_key_values.{i}.key|value` for layers
  {{ ranges(kv_layers) }}{% if mode == "gated" %}, `routing_decisions`, `run_layer.{i}` for layers {{ ranges(routed) }}{% endif %}
- outputs: `logits`, `present.{i}.key|value` for the same layers{% if mode == "gated" %}, `decisions`{% endif %},
  `last_logits` (the last position's logits), `next_token` (their argmax: all a greedy loop copies off the device)
{% if logits == "selected" -%}
- also `logits_positions` (batch, K) int64: the positions (0…T-1) of the step's tokens whose `logits` (batch, K, vocab)
  the graph computes. A generate loop gives the last position only, so a prefill runs the LM head on one position,
  not on the whole prompt; validation gives every position. ONNX Runtime GenAI feeds no such input, so this package
  has no `genai_config.json`.
{% endif -%}
{% if kv_cache == "preallocated" -%}
{% if attention != "gqa" %}- also `cache_position` (the slots this step writes)
{% endif -%}
- KV cache: preallocated buffers (batch, {{ kv_heads }} kv heads, capacity, {{ head_dim }}), {{ dtype }}, written in
  place; batch, sequence and capacity are dynamic.
{%- else -%}
- KV cache: (batch, {{ kv_heads }} kv heads, sequence, {{ head_dim }}), {{ dtype }}; batch, sequence and past
  lengths are dynamic.
{%- endif %}
"""


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2, 5, 7-8``."""
    out: list[str] = []
    for i in sorted(layers):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in out) or "none"


def _fmt(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4f}"
    return f"{x:.3g}"


def render_readme(info: dict[str, Any], report: dict[str, Any], genai: bool) -> str:
    import jinja2

    from .. import __version__

    spec = info["spec"]
    plan = info.get("plan") or {}
    env = jinja2.Environment(keep_trailing_newline=True, autoescape=False)
    env.globals["fmt"] = _fmt
    env.globals["ranges"] = layer_ranges
    return env.from_string(README_TEMPLATE).render(
        model_id=info["model"]["source"].get("model_id"),
        revision=info["model"]["source"].get("revision"),
        version=__version__,
        mode=info["mode"],
        dtype=info["dtype"],
        opset=info["opset"],
        num_layers=spec["num_layers"],
        skipped=plan.get("skip", []),
        kv_layers=spec["kv_layers"],
        routed=spec["routed_layers"],
        prefill_always=spec.get("prefill_always", []),
        target=spec["target"],
        data_mb=round(info["files"][DATA_NAME]["bytes"] / 1e6, 1),
        genai=genai,
        kv_cache=info.get("kv_cache", "growing"),
        logits=info.get("logits", "all"),
        phase_graphs=bool(info.get("phase_graphs")),
        attention=info.get("attention", "fused"),
        report=report,
        inputs=info["inputs"],
        outputs=info["outputs"],
        kv_heads=info["model"]["num_key_value_heads"],
        head_dim=info["model"]["head_dim"],
    )


def _place(src: Path, dst: Path) -> None:
    """Copy (not a hard link: onnx's checker and loaders refuse external data files with several links)."""
    shutil.copy2(src, dst)


def package_ort_gpu(onnx_dir: str | Path, output_dir: str | Path, report: Any, *, allow_failed: bool = False) -> Path:
    """Write the ``ort-gpu`` package for the export in ``onnx_dir``; ``report`` is the ``ParityReport`` (or the
    path of its JSON) that validated this export. Returns the package folder."""
    onnx_dir = Path(onnx_dir)
    info = load_export_info(onnx_dir)
    report_dict = _report_dict(report)
    if Path(report_dict.get("onnx_dir", "")).resolve() != onnx_dir.resolve():
        raise ArtifactMismatch(f"the parity report is for {report_dict.get('onnx_dir')}, not for {onnx_dir}")
    if not report_dict.get("passed") and not allow_failed:
        failed = [c["name"] for c in report_dict["checks"] if not c["passed"]]
        raise ArtifactMismatch(f"the export failed validation ({', '.join(failed)}); not packaging it")
    output_dir = Path(output_dir)
    genai = (info["mode"] == "static" and info.get("kv_cache", "growing") == "growing"
             and info.get("logits", "all") == "all")
    with atomic_directory(output_dir) as staging:
        for item in sorted(onnx_dir.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                _place(item, staging / item.name)
        if genai:
            write_genai_config(staging, info)
        write_text_atomic(staging / RUNNER_NAME, render_runner(info))
        os.chmod(staging / RUNNER_NAME, 0o755)
        write_json_atomic(staging / REPORT_NAME, report_dict)
        write_text_atomic(staging / "README.md", render_readme(info, report_dict, genai))
        check_graph(staging / GRAPH_NAME)
        load_export_info(staging)
        make_readable(staging)
    return output_dir


def _report_dict(report: Any) -> dict[str, Any]:
    if report is None:
        raise ArtifactMismatch("an ort-gpu package ships the parity report of its graph: validate the export first")
    if hasattr(report, "to_dict"):
        return report.to_dict()
    path = Path(report)
    if not path.is_file():
        raise ArtifactMismatch(f"parity report not found: {path}")
    d = read_json(path)
    if not str(d.get("format", "")).startswith("rtexport.parity_report/"):
        raise ArtifactMismatch(f"{path} is not an rtexport parity report")
    return d


__all__ = ["package_ort_gpu", "render_runner", "runtime_source", "GRAPH_NAME", "DATA_NAME", "INFO_NAME", "GENAI_CONFIG"]
