"""Model intake: every ONNX source (and every exported model) is checked before any stage runs, and
anything wrong with it is bad input (JobError, exit 2) naming the user's file and the tensor or node.

Models are built with onnx.helper in each test (see `tests.security.models`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pipeline
from pipeline.intake import IntakeResult, ModelSubject, check_model_file, check_onnx_source
from tests.security.models import matmul_model, save_external, write_job
from tests.unit.test_cli import flat, invoke


def _job(
    tmp_path: Path, model: onnx.ModelProto, inputs: list[dict] | None = None
) -> tuple[pipeline.ConversionJob, Path]:
    path = tmp_path / "user" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return pipeline.load_job(write_job(tmp_path, path, inputs)), path


def _refused(tmp_path: Path, model: onnx.ModelProto, inputs: list[dict] | None = None) -> pipeline.JobError:
    job, path = _job(tmp_path, model, inputs)
    with pytest.raises(pipeline.JobError) as excinfo:
        check_onnx_source(job, path)
    assert str(path) in str(excinfo.value)  # the user's file is named
    assert excinfo.value.exit_code == pipeline.ExitCode.BAD_INPUT
    return excinfo.value


def _constant_of_shape(shape: list[int], name: str = "bomb") -> tuple[onnx.NodeProto, onnx.TensorProto]:
    node = helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_out"], name=name)
    return node, numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{name}_shape")


def test_a_valid_model_passes_with_a_typed_result(tmp_path: Path) -> None:
    job, path = _job(tmp_path, matmul_model())

    result = check_onnx_source(job, path)

    assert result == IntakeResult(inputs=("x",), outputs=("y",), external_data=(), constant_bytes=0)


def test_external_data_files_are_checked_and_hashed(tmp_path: Path) -> None:
    path = save_external(matmul_model(), tmp_path / "user" / "model.onnx")
    job = pipeline.load_job(write_job(tmp_path, path))

    result = check_onnx_source(job, path)

    (data,) = result.external_data
    content = (path.parent / "model.onnx.data").read_bytes()
    assert (data.location, data.size, data.tensors) == ("model.onnx.data", len(content), 1)
    assert data.sha256 == hashlib.sha256(content).hexdigest()


def test_an_undefined_element_type_is_refused(tmp_path: Path) -> None:
    model = matmul_model()
    model.graph.initializer[0].data_type = TensorProto.UNDEFINED

    error = _refused(tmp_path, model)

    assert "tensor 'W'" in error.problem and "UNDEFINED" in error.problem


def test_initializer_bytes_that_do_not_match_the_dims_are_refused(tmp_path: Path) -> None:
    model = matmul_model()
    model.graph.initializer[0].dims[1] = 512  # 8 KiB of data for an 8 x 512 float tensor

    error = _refused(tmp_path, model)

    assert "tensor 'W'" in error.problem and "8192 bytes" in error.problem and "16384" in error.problem


def test_an_input_the_model_lacks_names_the_inputs_it_has(tmp_path: Path) -> None:
    error = _refused(tmp_path, matmul_model(), inputs=[{"name": "image", "shape": ["batch", 8]}])

    assert error.key == "inputs[0].name"
    assert "'image'" in error.problem and "['x']" in error.problem


def test_an_element_type_mismatch_is_refused(tmp_path: Path) -> None:
    error = _refused(tmp_path, matmul_model(), inputs=[{"name": "x", "shape": ["batch", 8], "dtype": "float16"}])

    assert error.key == "inputs[0].dtype"
    assert "FLOAT" in error.problem and "float16" in error.problem


def test_a_rank_mismatch_is_refused(tmp_path: Path) -> None:
    error = _refused(tmp_path, matmul_model(), inputs=[{"name": "x", "shape": ["batch", 1, 8]}])

    assert error.key == "inputs[0].shape" and "rank 2" in error.problem


def test_a_model_input_the_job_does_not_list_is_refused(tmp_path: Path) -> None:
    model = matmul_model()
    model.graph.input.append(helper.make_tensor_value_info("extra_in", TensorProto.INT64, ["batch"]))

    error = _refused(tmp_path, model)

    assert error.key == "inputs" and "'extra_in'" in error.problem


def test_a_fixed_dim_the_job_names_dynamic_is_refused(tmp_path: Path) -> None:
    error = _refused(tmp_path, matmul_model(input_shape=[4, 8]))

    assert error.key == "inputs[0].shape"
    assert "input 'x' axis 0 ('batch') should be dynamic but the graph fixes it to 4" in error.problem


def test_a_constant_of_shape_bomb_is_refused_naming_the_node(tmp_path: Path) -> None:
    node, shape = _constant_of_shape([2**20, 2**17, 8])  # 2^40 floats: 4 TiB

    error = _refused(tmp_path, matmul_model(extra_nodes=[node], extra_initializers=[shape]))

    assert "node 'bomb'" in error.problem and "ConstantOfShape" in error.problem
    assert "4.0 TiB" in error.problem and "4.0 GiB" in error.problem


def test_an_expand_bomb_is_refused(tmp_path: Path) -> None:
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    shape = numpy_helper.from_array(np.array([2**16, 2**16, 2**8], dtype=np.int64), "big")
    node = helper.make_node("Expand", ["one", "big"], ["wide"], name="widen")

    error = _refused(tmp_path, matmul_model(extra_nodes=[node], extra_initializers=[one, shape]))

    assert "node 'widen'" in error.problem and "Expand" in error.problem


def test_constant_memory_under_the_limit_is_reported_and_over_a_given_limit_refused(tmp_path: Path) -> None:
    node, shape = _constant_of_shape([1024, 1024])  # 4 MiB of floats
    job, path = _job(tmp_path, matmul_model(extra_nodes=[node], extra_initializers=[shape]))

    assert check_onnx_source(job, path).constant_bytes == 4 * 2**20
    with pytest.raises(pipeline.JobError, match="over the limit of 1.0 MiB"):
        check_model_file(job, ModelSubject.onnx_source(path), memory_limit_bytes=2**20)


@pytest.mark.parametrize("where", ["initializer", "input", "constant_of_shape"])
def test_a_dim_of_two_to_the_31_is_refused(where: str, tmp_path: Path) -> None:
    model = matmul_model()
    if where == "initializer":
        model.graph.initializer.append(TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[2**31]))
    elif where == "input":
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**31
    else:
        node, shape = _constant_of_shape([2**31])
        model.graph.node.append(node)
        model.graph.initializer.append(shape)

    error = _refused(tmp_path, model)

    assert str(2**31) in error.problem and "2^31 - 1" in error.problem


def test_a_graph_the_checker_rejects_is_refused(tmp_path: Path) -> None:
    model = matmul_model(extra_nodes=[helper.make_node("Relu", ["nowhere"], ["r"], name="dangling")])

    error = _refused(tmp_path, model)

    assert "fails the ONNX checker" in error.problem and "nowhere" in error.problem


def test_an_opset_newer_than_any_known_is_refused(tmp_path: Path) -> None:
    model = matmul_model()
    model.opset_import[0].version = 255

    error = _refused(tmp_path, model)

    assert "opset 255" in error.problem


def test_text_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    job, path = _job(tmp_path, matmul_model())
    path.write_bytes(path.read_bytes().replace(b"batch", b"b\x8ctch"))

    with pytest.raises(pipeline.JobError, match="not valid UTF-8") as excinfo:
        check_onnx_source(job, path)
    assert "dim_param" in str(excinfo.value)


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    job, path = _job(tmp_path, matmul_model())
    path.write_bytes(b"\x91\x92 not a protobuf \xff" * 10)

    with pytest.raises(pipeline.JobError, match="is not a readable ONNX model") as excinfo:
        check_onnx_source(job, path)
    assert str(path) in str(excinfo.value)


def test_an_exported_model_is_named_by_its_source_never_by_the_staging_path(tmp_path: Path) -> None:
    job, _ = _job(tmp_path, matmul_model())
    staged = tmp_path / ".out.staging-x" / "model.fp32.onnx"
    staged.parent.mkdir()
    onnx.save_model(matmul_model(input_shape=[4, 8]), str(staged))
    subject = ModelSubject(path=staged, shown="the model exported from pkg.mod:build", key="model.factory", hint="")

    with pytest.raises(pipeline.JobError) as excinfo:
        check_model_file(job, subject)

    message = str(excinfo.value)
    assert "the model exported from pkg.mod:build" in message and "staging" not in message


def test_a_bomb_exits_2_on_the_command_line(tmp_path: Path) -> None:
    node, shape = _constant_of_shape([2**20, 2**17, 8])
    job, path = _job(tmp_path, matmul_model(extra_nodes=[node], extra_initializers=[shape]))

    result = invoke("convert", str(job.source_file))

    assert result.exit_code == 2, result.output
    assert flat(str(path)) in flat(result.stderr) and "bomb" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_fixed_dim_named_dynamic_exits_2_on_the_command_line(tmp_path: Path) -> None:
    job, _ = _job(tmp_path, matmul_model(input_shape=[4, 8]))

    result = invoke("convert", str(job.source_file))

    assert result.exit_code == 2, result.output
    assert flat("should be dynamic but the graph fixes it to 4") in flat(result.stderr)


def test_an_input_missing_from_the_job_exits_2_on_the_command_line(tmp_path: Path) -> None:
    model = matmul_model()
    model.graph.input.append(helper.make_tensor_value_info("extra_in", TensorProto.INT64, ["batch"]))
    job, _ = _job(tmp_path, model)

    result = invoke("convert", str(job.source_file))

    assert result.exit_code == 2, result.output
    assert "extra_in" in result.stderr
