"""ONNX stage: static and gated export, the ONNX Runtime session and generate loop, GenAI config, ort-gpu package."""

from .export import DATA_NAME, GRAPH_NAME, INFO_NAME, check_graph, export_onnx, load_export_info
from .genai import genai_config, write_genai_config
from .graph_model import DecoderGraph, GraphSpec, build_spec
from .package import package_ort_gpu
from .runtime import Cache, OrtCausalLM, StepOutput

__all__ = [
    "DATA_NAME",
    "GRAPH_NAME",
    "INFO_NAME",
    "Cache",
    "DecoderGraph",
    "GraphSpec",
    "OrtCausalLM",
    "StepOutput",
    "build_spec",
    "check_graph",
    "export_onnx",
    "genai_config",
    "load_export_info",
    "package_ort_gpu",
    "write_genai_config",
]
