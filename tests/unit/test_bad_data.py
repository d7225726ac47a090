"""Bad data and models that quantize to nothing: bad input (exit 2), never a pass or an internal error.

* NaN / infinity in calibration or evaluation data is refused with a `JobError` naming the data,
  the input, the batch and the count; found before anything is written for an .npz, while
  streaming for a factory. ``nonfinite = "drop"`` leaves those samples out and reports how many.
  An additive attention mask (only 0 and -inf) is not bad data.
* A quantized model with no quantized node is refused (an int8 policy would pass the float model).
* A backend that cannot open or place a model in validation is a `BackendError` (exit 2) naming
  the model and the target, not a `StageError`.

Models are built in the test (a two-layer MatMul network given as an ONNX file), so nothing is
exported from PyTorch.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pipeline
from backends.errors import BackendError
from backends.ort import OrtBackend
from pipeline.errors import ExitCode, JobError, StageError
from pipeline.feeds import FeedSource
from pipeline.job import DataSource, InputSpec
from pipeline.stages.quantize import QuantizeStage
from tests.conftest import tree

FEATURES, HIDDEN, CLASSES = 16, 32, 4
INPUTS = [InputSpec(name="x", shape=["batch", FEATURES])]


def write_model(path: Path, custom_op: bool = False) -> Path:
    """logits = Relu(x @ W1) @ W2 (a ``Foo`` op of an unknown domain at the end with `custom_op`)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["mm" if custom_op else "logits"], name="fc2"),
    ]
    opsets = [helper.make_opsetid("", 18)]
    if custom_op:
        nodes.append(helper.make_node("Foo", ["mm"], ["logits"], domain="ai.example", name="foo"))
        opsets.append(helper.make_opsetid("ai.example", 1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[
            numpy_helper.from_array((rng.normal(size=(FEATURES, HIDDEN)) * 0.3).astype(np.float32), "w1"),
            numpy_helper.from_array((rng.normal(size=(HIDDEN, CLASSES)) * 0.3).astype(np.float32), "w2"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=9), path)
    return path


def samples(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, FEATURES)).astype(np.float32)


def job_dict(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """An ONNX-source job over `x`; calibration from calibration.npz (written by the caller)."""
    return {
        "name": "bad_data",
        "model": {"onnx": str(tmp_path / "model.onnx")},
        "inputs": [{"name": "x", "shape": ["batch", FEATURES]}],
        "calibration": {"npz": str(tmp_path / "calibration.npz"), "batch_size": 8},
        "quantize": {"calibration_cache": False, "recipes": ["static"]},
        "output_dir": str(tmp_path / "out"),
        **sections,
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_model(tmp_path / "model.onnx")
    np.savez(tmp_path / "calibration.npz", x=samples(32))
    return tmp_path


def convert_refused(job: dict[str, Any], tmp_path: Path) -> JobError:
    """Convert; expect a JobError (exit 2) and nothing left in tmp_path but what the test wrote."""
    before = tree(tmp_path)
    with pytest.raises(JobError) as caught:
        pipeline.convert(pipeline.validate_job(job, origin=tmp_path / "job.toml"))
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    assert tree(tmp_path) == before, "the refused job left files behind"
    return caught.value


def feed_source(source: DataSource, key: str = "calibration") -> FeedSource:
    return FeedSource(source, INPUTS, origin="job.toml", key=key, python_path=[])


# ---------------------------------------------------------------- NaN / inf, FeedSource level


def test_npz_nonfinite_is_found_up_front_naming_file_input_batch_and_count(tmp_path: Path) -> None:
    data = samples(40)
    data[19, 3] = np.nan  # batch 2 of 8-sample batches
    data[20, 0] = np.inf
    data[21, 5] = -np.inf
    np.savez(tmp_path / "cal.npz", x=data)
    feeds = feed_source(DataSource(npz=tmp_path / "cal.npz", batch_size=8))

    with pytest.raises(JobError) as caught:
        feeds.check()  # preflight: every batch of an .npz, not only the first

    error = caught.value
    assert error.key == "calibration.npz"
    assert str(tmp_path / "cal.npz") in error.problem
    assert "batch 2, input 'x': 3 non-finite values (NaN or infinity) in 3 of its 8 samples" in error.problem
    assert 'calibration.nonfinite = "drop"' in error.problem


def test_factory_nonfinite_is_refused_while_streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"nan_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def batches():
                for index in range(4):
                    x = np.ones((4, 16), np.float32)
                    if index == 2:
                        x[1, 1] = np.nan
                    yield {"x": x}
            """
        )
    )
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    feeds = FeedSource(
        DataSource(factory=f"{module}:batches"), INPUTS, origin="job.toml", key="evaluation", python_path=[tmp_path]
    )
    feeds.check()  # a factory's first batch only: it is fine

    with pytest.raises(JobError) as caught:
        list(feeds)

    assert caught.value.key == "evaluation.factory"
    assert f"the batches of {module}:batches: batch 2, input 'x': 1 non-finite value" in caught.value.problem
    assert 'evaluation.nonfinite = "drop"' in caught.value.problem
    sys.modules.pop(module, None)


def test_drop_leaves_samples_out_with_their_labels_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, labels = samples(20), np.arange(20)
    data[[3, 4, 17], 0] = [np.nan, np.inf, np.nan]
    np.savez(tmp_path / "cal.npz", x=data, label=labels)
    feeds = feed_source(DataSource(npz=tmp_path / "cal.npz", labels="label", batch_size=8, nonfinite="drop"))
    assert feeds.dropped_samples is None

    with caplog.at_level(logging.WARNING, logger="pipeline.feeds"):
        feeds.check()
        batches = list(feeds)
        list(feeds)

    assert [batch.size for batch in batches] == [6, 8, 3]
    kept = np.concatenate([batch.labels for batch in batches if batch.labels is not None])
    assert kept.tolist() == [n for n in range(20) if n not in (3, 4, 17)]
    assert np.isfinite(np.concatenate([batch.feeds["x"] for batch in batches])).all()
    assert feeds.dropped_samples == 3
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == ['calibration data (cal.npz): dropped 3 of 20 samples holding NaN or infinity '
                        '(calibration.nonfinite = "drop")']  # fmt: skip


def test_drop_of_every_sample_is_no_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "cal.npz", x=np.full((4, FEATURES), np.nan, np.float32))
    with pytest.raises(JobError, match=r"yielded no batches \(4 samples with NaN or infinity were dropped\)"):
        feed_source(DataSource(npz=tmp_path / "cal.npz", nonfinite="drop")).check()


def test_an_additive_attention_mask_is_not_bad_data(tmp_path: Path) -> None:
    mask = np.where(np.random.default_rng(0).random((8, FEATURES)) < 0.5, -np.inf, 0.0).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=mask)
    feeds = feed_source(DataSource(npz=tmp_path / "cal.npz"))
    feeds.check()
    assert np.array_equal(next(iter(feeds)).feeds["x"], mask)
    # A mask that also holds +inf, or other values with -inf, is not a mask.
    np.savez(tmp_path / "cal.npz", x=np.where(mask == 0, 1.0, -np.inf).astype(np.float32))
    with pytest.raises(JobError, match="non-finite"):
        feed_source(DataSource(npz=tmp_path / "cal.npz")).check()


def test_drop_mode_is_part_of_the_data_digest(tmp_path: Path) -> None:
    np.savez(tmp_path / "cal.npz", x=samples(8))
    plain = feed_source(DataSource(npz=tmp_path / "cal.npz")).digest()
    dropping = feed_source(DataSource(npz=tmp_path / "cal.npz", nonfinite="drop")).digest()
    assert plain != dropping


# ---------------------------------------------------------------- NaN / inf, end to end


def test_nan_in_calibration_data_is_refused_before_anything_is_written(model_dir: Path) -> None:
    data = samples(32)
    data[10, 2] = data[11, 7] = np.nan
    np.savez(model_dir / "calibration.npz", x=data)

    error = convert_refused(job_dict(model_dir), model_dir)

    assert error.key == "calibration.npz"
    assert "batch 1, input 'x': 2 non-finite values (NaN or infinity) in 2 of its 8 samples" in error.problem


def test_nan_in_evaluation_data_is_bad_input_not_a_parity_failure(model_dir: Path) -> None:
    data = samples(24, seed=2)
    data[0, 0] = np.nan
    np.savez(model_dir / "heldout.npz", x=data)
    job = job_dict(model_dir, evaluation={"npz": str(model_dir / "heldout.npz"), "batch_size": 8})

    error = convert_refused(job, model_dir)

    assert error.key == "evaluation.npz"
    assert "heldout.npz: batch 0, input 'x': 1 non-finite value" in error.problem


def test_drop_converts_and_reports_the_dropped_samples(model_dir: Path) -> None:
    data = samples(32)
    data[[1, 2, 30], 4] = np.nan
    np.savez(model_dir / "calibration.npz", x=data)
    job = job_dict(model_dir)
    job["calibration"]["nonfinite"] = "drop"

    result = pipeline.convert(pipeline.validate_job(job, origin=model_dir / "job.toml"))

    manifest = json.loads(result.manifest_path.read_text())
    quantize = next(stage for stage in manifest["stages"] if stage["name"] == "quantize")["artifact"]["metadata"]
    assert quantize["calibration"]["dropped_samples"] == 3
    # 29 samples left in 4 batches of 8; the fourth (7 after the drop) is held out for judging.
    assert quantize["calibration"]["samples"] == 29 - 7
    assert quantize["quantize_linear"] > 0
    # Parity ran on the calibration data (no [evaluation]): the report says what it left out.
    assert any("3 samples holding NaN or infinity were left out" in note for note in result.report.notes)


# ---------------------------------------------------------------- nothing quantized


def test_a_model_with_no_quantized_node_is_refused_not_passed(model_dir: Path) -> None:
    job = job_dict(model_dir, quantize={"op_types": ["LSTM"], "calibration_cache": False})

    error = convert_refused(job, model_dir)

    assert error.key == "quantize"
    assert "no node was quantized, so the int8 model would be the float model" in error.problem
    assert "['LSTM']" in error.problem


def test_every_node_excluded_names_the_exclusions(model_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import stage_context

    job = pipeline.validate_job(
        job_dict(model_dir, quantize={"exclude_nodes": ["fc1", "relu", "fc2"], "calibration_cache": False}),
        origin="job.toml",
    )
    work = tmp_path / "work"
    work.mkdir()
    ctx = stage_context(job, write_model(work / "model.simplified.onnx"), after="simplify")

    with pytest.raises(JobError) as caught:
        QuantizeStage().run(ctx)

    assert "3 node(s) were kept float: fc1: listed in quantize.exclude_nodes" in caught.value.problem
    assert not (work / "model.int8.onnx").exists()


def test_a_few_float_nodes_still_quantize(model_dir: Path, tmp_path: Path) -> None:
    # A regression guard (it passed before the check existed): some float nodes are no refusal.
    from tests.conftest import stage_context

    job = pipeline.validate_job(
        job_dict(model_dir, quantize={"exclude_nodes": ["fc2"], "calibration_cache": False}), origin="job.toml"
    )
    work = tmp_path / "work"
    work.mkdir()
    ctx = stage_context(job, write_model(work / "model.simplified.onnx"), after="simplify")

    artifact = QuantizeStage().run(ctx)

    assert artifact.metadata["dequantize_linear"] > 0
    assert "fc2" in artifact.metadata["kept_float"]


# ---------------------------------------------------------------- backends at validate


def test_a_model_the_backend_cannot_load_is_bad_input(tmp_path: Path) -> None:
    write_model(tmp_path / "model.onnx", custom_op=True)
    np.savez(tmp_path / "calibration.npz", x=samples(16))
    job = job_dict(tmp_path, quantize={"enabled": False})

    before = tree(tmp_path)
    with pytest.raises(pipeline.OnnxforgeError) as caught:
        pipeline.convert(pipeline.validate_job(job, origin=tmp_path / "job.toml"))

    assert not isinstance(caught.value, StageError), caught.value
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    assert tree(tmp_path) == before


@pytest.mark.parametrize("method", ["open", "placement"])
def test_backend_errors_in_validation_name_the_model_and_target(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    def refuse(self: OrtBackend, model: Path, options: object = None) -> object:
        raise BackendError(self.name, f"ONNX Runtime could not load {model.name}: refused by the test", "a hint")

    monkeypatch.setattr(OrtBackend, method, refuse)
    job = job_dict(model_dir, quantize={"enabled": False})

    with pytest.raises(BackendError) as caught:
        pipeline.convert(pipeline.validate_job(job, origin=model_dir / "job.toml"))

    message = str(caught.value)
    if method == "open":  # the first model of the chain: the copy of the job's ONNX file
        assert (
            f"cannot open model.fp32.onnx (job 'bad_data', the job's model.onnx {model_dir / 'model.onnx'})" in message
        )
    else:  # placement is of the last model
        assert "cannot place model.simplified.onnx (job 'bad_data', from the simplify stage)" in message
    assert "on target 'cpu'" in message and "refused by the test" in message
    assert caught.value.hint == "a hint"
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    assert not (model_dir / "out").exists()
