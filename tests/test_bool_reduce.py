"""``rtexport/onnx/bool_reduce.py``: torch.any's Cast → ReduceMax → Cast over bools becomes one bool ReduceMax, with
the same result, and nothing else is touched."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rtexport.onnx.bool_reduce import reduce_bool_any


def _any_graph(opset: int, source_op: str = "Greater", reused: bool = False) -> onnx.ModelProto:
    """y = any(x > 0) as torch.onnx writes it, inside an If branch and in the main graph; ``reused``: the float
    maximum is also a graph output (so it must stay)."""
    def chain(prefix: str, src: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Cast", [src], [f"{prefix}f"], to=TensorProto.FLOAT),
                helper.make_node("ReduceMax", [f"{prefix}f"], [f"{prefix}m"], keepdims=0),
                helper.make_node("Cast", [f"{prefix}m"], [f"{prefix}y"], to=TensorProto.BOOL)]

    branch = helper.make_graph(chain("b_", "gt"), "branch", [],
                               [helper.make_tensor_value_info("b_y", TensorProto.BOOL, [])])
    other = helper.make_graph([helper.make_node("Identity", ["main_y"], ["o_y"])], "other", [],
                              [helper.make_tensor_value_info("o_y", TensorProto.BOOL, [])])
    nodes = [helper.make_node(source_op, ["x", "zero"] if source_op == "Greater" else ["x"], ["gt"]),
             *chain("main_", "gt"),
             helper.make_node("If", ["main_y"], ["y"], then_branch=branch, else_branch=other)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.BOOL, [])]
    if reused:
        outputs.append(helper.make_tensor_value_info("main_m", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])], outputs,
                              initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: list[float]) -> bool:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return bool(session.run(["y"], {"x": np.array(x, dtype=np.float32)})[0])


@pytest.mark.parametrize("x", [[-1.0, 2.0, -3.0], [-1.0], [0.5]])
def test_any_becomes_one_bool_reduce_max_with_the_same_result(x):
    model = _any_graph(23)
    want = _run(model, x)
    assert reduce_bool_any(model) == 2  # the main graph's and the branch's
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Greater", "ReduceMax", "If"]
    then = next(a.g for a in model.graph.node[2].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["ReduceMax"] and then.node[0].input[0] == "gt"
    assert _run(model, x) == want == any(v > 0 for v in x)


def test_what_is_not_an_any_of_bools_stays():
    assert reduce_bool_any(_any_graph(18)) == 0  # bools reduce from opset 20 only
    assert reduce_bool_any(_any_graph(23, source_op="Relu")) == 0  # the cast's input is not bool
    model = _any_graph(23, reused=True)  # the float maximum is read elsewhere: the main graph's chain stays
    assert reduce_bool_any(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Greater", "Cast", "ReduceMax", "Cast", "If"]
