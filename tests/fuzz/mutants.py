"""Seeded mutators of ONNX models and job files, and the harness that runs a conversion on each.

A mutant is the seed with one to three random edits of the kinds a damaged or hostile file has:
wrong dims and dtypes, missing or renamed tensors, unknown ops and attributes, huge shapes, broken
external-data entries, truncated or flipped bytes. The harness converts each one in-process and
classifies the outcome by the exit code the CLI would give (`pipeline.errors.ExitCode`), so a test
can require that only 0 / 1 / 2 happen, that no untyped exception escapes, and that a failed run
leaves nothing in its output folder.
"""

from __future__ import annotations

import contextlib
import copy
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import pipeline
from pipeline.errors import ExitCode, OnnxforgeError

FEATURES, HIDDEN, CLASSES, SAMPLES = 8, 12, 4, 32
_ELEM_TYPES = [value for value in TensorProto.DataType.values() if value != TensorProto.FLOAT]


def seed_model() -> onnx.ModelProto:
    """A valid two-layer classifier: Gemm -> Relu -> MatMul -> Add, batch dim named."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.normal(size=(HIDDEN, FEATURES)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=HIDDEN).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["logits"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "seed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def seed_job(folder: Path, model: Path) -> dict[str, Any]:
    """A job converting `model` (an ONNX file) with small calibration and labelled evaluation data."""
    calibration, evaluation = folder / "calibration.npz", folder / "evaluation.npz"
    if not evaluation.exists():
        rng = np.random.default_rng(1)
        x = rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32)
        np.savez(calibration, x=x)
        np.savez(evaluation, x=x, y=rng.integers(0, CLASSES, SAMPLES))
    return {
        "name": "fuzz",
        "model": {"onnx": str(model)},
        "inputs": [{"name": "x", "shape": ["batch", FEATURES]}],
        "calibration": {"npz": str(calibration), "batch_size": 16},
        "evaluation": {"npz": str(evaluation), "labels": "y", "batch_size": 16},
        "quantize": {"mixed_precision": False, "calibration_cache": False},
        "parity": {"localize": "never"},
        "output_dir": str(folder / "out"),
    }


# --- model edits ----------------------------------------------------------------------------

Edit = Callable[[onnx.ModelProto, random.Random], None]


def _dims(model: onnx.ModelProto, rng: random.Random) -> list[onnx.TensorShapeProto.Dimension]:
    values = [*model.graph.input, *model.graph.output]
    return [dim for value in values for dim in value.type.tensor_type.shape.dim]


def resize_dim(model: onnx.ModelProto, rng: random.Random) -> None:
    """A graph input/output dim set to a fixed size, 0, a huge size, or a new name."""
    dim = rng.choice(_dims(model, rng))
    size = rng.choice([0, 1, 3, 7, 2**31, 2**40, -1, None])
    if size is None:
        dim.dim_param = "other"
    else:
        dim.dim_value = size


def retype_value(model: onnx.ModelProto, rng: random.Random) -> None:
    """A graph input, output or initializer given another (possibly undefined) element type."""
    elem = rng.choice([*_ELEM_TYPES, TensorProto.UNDEFINED])
    if rng.random() < 0.5:
        value = rng.choice([*model.graph.input, *model.graph.output])
        value.type.tensor_type.elem_type = elem
    else:
        rng.choice(model.graph.initializer).data_type = elem


def drop_initializer(model: onnx.ModelProto, rng: random.Random) -> None:
    """An initializer removed (its consumers now read a tensor nobody makes)."""
    del model.graph.initializer[rng.randrange(len(model.graph.initializer))]


def rename_tensor(model: onnx.ModelProto, rng: random.Random) -> None:
    """A node input renamed to something undefined, or a graph input renamed."""
    if rng.random() < 0.5 and model.graph.node:
        node = rng.choice(model.graph.node)
        if node.input:
            node.input[rng.randrange(len(node.input))] = "ghost"
    else:
        model.graph.input[0].name = rng.choice(["x2", "", "logits", "w1"])


def change_op(model: onnx.ModelProto, rng: random.Random) -> None:
    """A node turned into another (or a made-up) operator."""
    if model.graph.node:
        rng.choice(model.graph.node).op_type = rng.choice(["Conv", "Softmax", "Transpose", "NoSuchOp", "Loop", ""])


def bad_attribute(model: onnx.ModelProto, rng: random.Random) -> None:
    """A node given a bogus or wrongly typed attribute."""
    if model.graph.node:
        node = rng.choice(model.graph.node)
        node.attribute.append(helper.make_attribute(rng.choice(["transB", "axis", "bogus"]), rng.choice([7, "s", 1.5])))


def drop_node(model: onnx.ModelProto, rng: random.Random) -> None:
    """A node removed."""
    if model.graph.node:
        del model.graph.node[rng.randrange(len(model.graph.node))]


def size_bomb(model: onnx.ModelProto, rng: random.Random) -> None:
    """A ConstantOfShape asking for a huge tensor, added to the output."""
    shape = numpy_helper.from_array(np.array([2**20, 2**20], dtype=np.int64), "bomb_shape")
    model.graph.initializer.append(shape)
    model.graph.node.append(helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], name="bomb"))
    model.graph.output.append(helper.make_tensor_value_info("bomb", TensorProto.FLOAT, None))


def break_weights(model: onnx.ModelProto, rng: random.Random) -> None:
    """An initializer's bytes truncated, or its dims made inconsistent with them."""
    tensor = rng.choice(model.graph.initializer)
    if rng.random() < 0.5 and tensor.raw_data:
        tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
    else:
        tensor.dims.append(rng.choice([0, 3, 2**31]))


def external_location(model: onnx.ModelProto, rng: random.Random) -> None:
    """An initializer moved to external data at a hostile or missing location."""
    tensor = rng.choice(model.graph.initializer)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    location = rng.choice(["../outside.bin", "/etc/hostname", "missing.bin", "w.bin"])
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(rng.choice([0, 2**40]))), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def versions(model: onnx.ModelProto, rng: random.Random) -> None:
    """The opset or IR version set to one that does not exist or does not fit."""
    if rng.random() < 0.5:
        model.opset_import[0].version = rng.choice([1, 6, 99])
    else:
        model.ir_version = rng.choice([0, 2, 99])


EDITS: tuple[Edit, ...] = (
    resize_dim,
    retype_value,
    drop_initializer,
    rename_tensor,
    change_op,
    bad_attribute,
    drop_node,
    size_bomb,
    break_weights,
    external_location,
    versions,
)


def mutant(seed: int) -> tuple[bytes, str]:
    """The serialized seed model with one to three edits (or flipped bytes), and what was done."""
    rng = random.Random(seed)
    model = copy.deepcopy(seed_model())
    if rng.random() < 0.1:
        data = bytearray(model.SerializeToString())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), "flipped bytes"
    edits = [rng.choice(EDITS) for _ in range(rng.randint(1, 3))]
    for edit in edits:
        edit(model, rng)
    return model.SerializeToString(), "+".join(edit.__name__ for edit in edits)


# --- job edits ------------------------------------------------------------------------------


def job_mutant(raw: dict[str, Any], seed: int) -> tuple[dict[str, Any], str]:
    """The job with one or two random edits: keys dropped, misspelt or retyped, values out of range."""
    rng = random.Random(seed)
    job = copy.deepcopy(raw)
    done = []
    for _ in range(rng.randint(1, 2)):
        inputs = job.get("inputs")
        nested = [job.get(name) for name in ("calibration", "evaluation", "quantize", "model")]
        nested.append(inputs[0] if isinstance(inputs, list) and inputs else None)
        table = rng.choice([job, *(section for section in nested if isinstance(section, dict) and section)])
        key = rng.choice(sorted(table))
        action = rng.choice(["drop", "misspell", "retype", "extreme"])
        if action == "drop":
            del table[key]
        elif action == "misspell":
            table[key[:-1] or "x"] = table.pop(key)
        elif action == "retype":
            table[key] = rng.choice([None, "yes", 3.5, [], {}, -1, "../../etc/passwd"])
        else:
            table[key] = rng.choice([0, 2**63, -(2**31), 1e308, "", "a" * 300])
        done.append(f"{action} {key}")
    return job, ", ".join(done)


# --- the harness ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one conversion ended in.

    Attributes:
        case: What the mutant is.
        exit_code: The exit code the CLI would give (None: an untyped exception escaped).
        error: The error's type and first line ("" when it passed).
        leftovers: Files left in the output folder after a failed run, or staging folders beside it.
    """

    case: str
    exit_code: int | None
    error: str
    leftovers: list[str]


def convert(raw: dict[str, Any], case: str) -> Outcome:
    """Convert one job in-process and classify the outcome."""
    given = raw.get("output_dir")
    out = Path(given) if isinstance(given, str) and Path(given).is_absolute() else None
    exit_code: int | None
    try:
        job = pipeline.validate_job(raw, origin=f"fuzz job ({case})")
        pipeline.convert(job)
        exit_code, error = int(ExitCode.OK), ""
    except OnnxforgeError as e:
        exit_code, error = int(e.exit_code), f"{type(e).__name__}: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - the finding a fuzz run is for: an exception outside the hierarchy
        exit_code, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return Outcome(case, exit_code, error, _leftovers(out, exit_code))


def _leftovers(out: Path | None, exit_code: int | None) -> list[str]:
    """Hidden staging / previous folders beside the output; and after a failure, anything in it."""
    if out is None:
        return []
    found = [path.name for path in out.parent.glob(f".{out.name}.*") if not path.name.endswith(".lock")]
    if exit_code not in (int(ExitCode.OK), int(ExitCode.PARITY_FAILED)) and out.is_dir():
        found += [path.name for path in out.iterdir()]
    return found


def run_model_mutants(folder: Path, seeds: range) -> list[Outcome]:
    """Convert every model mutant of `seeds`, each with its own output folder."""
    outcomes = []
    for seed in seeds:
        data, case = mutant(seed)
        case_dir = folder / f"m{seed}"
        case_dir.mkdir()
        model = case_dir / "model.onnx"
        model.write_bytes(data)
        outcomes.append(convert(seed_job(folder, model) | {"output_dir": str(case_dir / "out")}, f"{seed}: {case}"))
        shutil.rmtree(case_dir, ignore_errors=True)
    return outcomes


def run_job_mutants(folder: Path, seeds: range) -> list[Outcome]:
    """Convert every job mutant of `seeds` around the valid seed model.

    The mutants run with `folder` as the current directory: a mutated relative path (an output
    folder named "yes") lands there, not in the caller's directory.
    """
    model = folder / "seed.onnx"
    onnx.save(seed_model(), model)
    outcomes = []
    with contextlib.chdir(folder):
        for seed in seeds:
            raw, case = job_mutant(seed_job(folder, model) | {"output_dir": str(folder / f"j{seed}" / "out")}, seed)
            outcomes.append(convert(raw, f"{seed}: {case}"))
            shutil.rmtree(folder / f"j{seed}", ignore_errors=True)
    return outcomes
