"""Rotary tables as constants: the graph's own per-position ops run on every position, and nothing
made where the ops are not provably per position or read more than the positions."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from pipeline.llm.rotary_tables import MAX_TABLE_BYTES, constant_table

WIDTH = 4
INVERSE = 1.0 / 10000 ** (np.arange(WIDTH, dtype=np.float32) / WIDTH)


def table_graph(
    middle: list[str] | None = None, extra_input: bool = False, scale_shape: tuple[int, ...] = ()
) -> ir.Model:
    """``cos(float(position_ids[..., None]) * inv_freq) * scale`` (a scaled rotary), with optional ops
    between the positions and the Cast, or an input added to the frequencies."""
    nodes = [
        helper.make_node("Constant", [], ["axis"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Constant", [], ["inv_freq"], value=numpy_helper.from_array(INVERSE)),
        helper.make_node(
            "Constant", [], ["scale"], value=numpy_helper.from_array(np.full(scale_shape, 0.5, np.float32))
        ),
    ]
    current = "position_ids"
    for index, op in enumerate(middle or []):
        axis = [helper.make_node("Constant", [], [f"a{index}"], value=numpy_helper.from_array(np.array(1, np.int64)))]
        nodes += axis + [helper.make_node(op, [current, f"a{index}"], [f"m{index}"])]
        current = f"m{index}"
    nodes += [
        helper.make_node("Unsqueeze", [current, "axis"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["float_positions"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["float_positions", "inv_freq"], ["freqs"]),
    ]
    if extra_input:
        nodes.append(helper.make_node("Add", ["freqs", "shift"], ["shifted"]))
    nodes += [
        helper.make_node("Cos", ["shifted" if extra_input else "freqs"], ["cos"]),
        helper.make_node("Mul", ["cos", "scale"], ["table"]),
    ]
    inputs = [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("shift", TensorProto.FLOAT, ["batch", "sequence", WIDTH]))
    outputs = [helper.make_tensor_value_info("table", TensorProto.FLOAT, ["batch", "sequence", WIDTH])]
    graph = helper.make_graph(nodes, "rotary", inputs, outputs)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_the_table_is_the_graphs_ops_on_every_position() -> None:
    model = table_graph()

    found = constant_table(model.graph.outputs[0], positions=10)

    assert found is not None
    source, table = found
    assert source is model.graph.inputs[0]
    expected = np.cos(np.arange(10, dtype=np.float32)[:, None] * INVERSE) * 0.5
    np.testing.assert_allclose(table, expected, rtol=1e-6, atol=1e-6)


def test_an_op_that_mixes_positions_makes_no_table() -> None:
    """A CumSum along the sequence makes each position's value depend on the others'."""
    assert constant_table(table_graph(middle=["CumSum"]).graph.outputs[0], positions=10) is None


def test_a_table_that_reads_another_input_makes_no_table() -> None:
    assert constant_table(table_graph(extra_input=True).graph.outputs[0], positions=10) is None


def test_a_constant_sized_by_the_export_sequence_makes_no_table() -> None:
    """A constant of the traced sequence's length does not broadcast over every position."""
    model = table_graph(scale_shape=(1, 3, WIDTH))

    assert constant_table(model.graph.outputs[0], positions=10) is None


def test_a_table_over_the_size_cap_stays_computed_each_step() -> None:
    """A context of millions of positions would add its table to the model: no table."""
    too_long = MAX_TABLE_BYTES // (4 * WIDTH) + 1

    assert constant_table(table_graph().graph.outputs[0], positions=too_long) is None
