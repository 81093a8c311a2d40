"""The benchmark tool that carries an exported graph without its weights and re-creates them on the measuring
machine (``examples/benchmarks/graph_weights.py``): the GPU numbers for the gated graph rest on it."""

from __future__ import annotations

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def graph_weights():
    return benchmark_script("graph_weights")


def test_gated_graph_refilled_from_the_same_model_is_identical_and_from_another_model_matches_it(
        graph_weights, tmp_path):
    # same model: byte-identical weights file and equal ORT logits; another model of the same shape: ORT's logits
    # are that model's (PyTorch DecoderGraph), through the nested If branches of the gated graph
    assert graph_weights._check_mode("gated", tmp_path) == []


def test_static_graph_round_trip_and_refusals(graph_weights, tmp_path):
    assert graph_weights._check_mode("static", tmp_path) == []
    # a module of another shape, and norms that the export stored merged into one initializer, are refused
    assert graph_weights._check_rejects(tmp_path) == []
