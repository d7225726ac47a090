"""The zoo's catalogue: every model family, its inputs, outputs, data, training and parity policy.

A job names :func:`build` as its factory with ``kwargs = { name = "<zoo model>" }``; trained
models also name the cached weights file (:func:`weights`), which the pipeline loads strictly
into what :func:`build` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.zoo import data, nets
from benchmarks.zoo import transformer_models as tm
from benchmarks.zoo.training import TrainSpec, trained_weights

Shape = list[int | str]


@dataclass(frozen=True)
class ZooInput:
    """One model input: name, shape (a string is a dynamic dim), dtype."""

    name: str
    shape: Shape
    dtype: str = "float32"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry.

    Attributes:
        name: Job name and key of :data:`ZOO`.
        family: What architecture family it stands for.
        make: Returns the (untrained, seeded) model.
        inputs: The ``forward`` inputs, in order.
        output_names: Names of the ONNX outputs.
        task: The job's ``model.task``.
        split: Returns the training / held-out data (calibration comes from train).
        train: The training recipe; ``None``: random weights, converted as built.
        labels: The evaluation data carries ``label`` (class labels) for accuracy.
        int8: The job's ``[parity.int8]`` table.
        outputs: The job's ``[parity.outputs]`` tables.
        check_shapes: Extra shapes export parity is checked at.
        calibration_samples: Samples of ``train`` used for calibration.
        evaluation_samples: Samples of ``test`` used for evaluation (all when larger).
    """

    name: str
    family: str
    make: Callable[[], nn.Module]
    inputs: tuple[ZooInput, ...]
    output_names: tuple[str, ...]
    task: str
    split: Callable[[], data.Split]
    train: TrainSpec | None = None
    labels: bool = False
    int8: dict[str, float] = field(default_factory=lambda: {"min_cosine": 0.99})
    outputs: dict[str, Any] = field(default_factory=dict)
    check_shapes: tuple[dict[str, int], ...] = ()
    calibration_samples: int = 256
    evaluation_samples: int = 360

    @property
    def input_names(self) -> list[str]:
        """The input names in ``forward`` order."""
        return [spec.name for spec in self.inputs]


def _seeded(cls: Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """``cls(**kwargs)`` built under seed 0, in eval mode."""
    torch.manual_seed(0)
    return cls(**kwargs).eval()


CLASSIFIER_INT8: dict[str, float] = {"min_cosine": 0.99, "max_accuracy_drop": 1.0}
IMAGE = (ZooInput("image", ["batch", 1, 8, 8]),)
TEXT_SHAPES = ({"batch": 1, "sequence": 8}, {"batch": 4, "sequence": 48})


def _text_inputs(*names: str) -> tuple[ZooInput, ...]:
    return tuple(ZooInput(name, ["batch", "sequence"], "int64") for name in names)


_ENTRIES: list[ZooModel] = [
    ZooModel(
        "vit", "ViT (transformers ViTConfig, random init)", tm.build_vit, (ZooInput("image", ["batch", 1, 16, 16]),),
        ("logits",), "classification", data.digits_16, evaluation_samples=128,
    ),
    ZooModel(
        "gpt2", "GPT-2 causal LM (transformers GPT2Config, no cache, random init)", tm.build_gpt2,
        _text_inputs("input_ids"), ("logits",), "other", partial(data.tokens, tm.VOCAB, mask=False),
        check_shapes=TEXT_SHAPES, calibration_samples=128,
    ),
    ZooModel(
        "bert_pair", "BERT with token types (transformers BertConfig, random init)", tm.build_bert_pair,
        _text_inputs("input_ids", "attention_mask", "token_type_ids"), ("logits",), "classification",
        partial(data.tokens, tm.VOCAB, pair=True), check_shapes=TEXT_SHAPES, calibration_samples=128,
    ),
    ZooModel(
        "t5_encoder", "T5 encoder (transformers T5Config, relative attention bias, random init)",
        tm.build_t5_encoder, _text_inputs("input_ids", "attention_mask"), ("last_hidden_state",), "embedding",
        partial(data.tokens, tm.VOCAB), check_shapes=TEXT_SHAPES, calibration_samples=128,
    ),
    ZooModel(
        "whisper_encoder", "Whisper encoder (transformers WhisperConfig, conv1d + transformer, random init)",
        tm.build_whisper_encoder, (ZooInput("input_features", ["batch", tm.WHISPER_MELS, tm.WHISPER_FRAMES]),),
        ("last_hidden_state",), "embedding", partial(data.mel_features, tm.WHISPER_MELS, tm.WHISPER_FRAMES),
        calibration_samples=128,
    ),
    ZooModel(
        "resnet_digits", "ResNet bottleneck CNN (trained on digits)", partial(_seeded, nets.ResNetDigits), IMAGE,
        ("logits",), "classification", data.digits_images, TrainSpec(epochs=15), True, CLASSIFIER_INT8,
    ),
    ZooModel(
        "mobilenet_digits", "MobileNetV2-style depthwise-separable CNN (trained on digits)",
        partial(_seeded, nets.MobileNetDigits), IMAGE, ("logits",), "classification", data.digits_images,
        TrainSpec(epochs=20), True, CLASSIFIER_INT8,
    ),
    ZooModel(
        "gru_digits", "GRU sequence classifier over digit rows (trained)", partial(_seeded, nets.RowRnn, cell="gru"),
        (ZooInput("rows", ["batch", 8, 8]),), ("logits",), "classification", data.digits_rows,
        TrainSpec(epochs=25, learning_rate=5e-3), True, CLASSIFIER_INT8,
    ),
    ZooModel(
        "lstm_digits", "LSTM sequence classifier over digit rows (trained)",
        partial(_seeded, nets.RowRnn, cell="lstm"), (ZooInput("rows", ["batch", 8, 8]),), ("logits",),
        "classification", data.digits_rows, TrainSpec(epochs=25, learning_rate=5e-3), True, CLASSIFIER_INT8,
    ),
    ZooModel(
        "unet_denoise", "U-Net encoder-decoder with skip concat (trained to denoise digits)",
        partial(_seeded, nets.UNet), (ZooInput("noisy", ["batch", 1, 16, 16]),), ("denoised",), "other",
        data.noisy_digits_16, TrainSpec(loss="mse", epochs=8), int8={"min_cosine": 0.99, "min_snr_db": 20.0},
    ),
    ZooModel(
        "audio_conv1d", "Conv1d audio classifier, strided + dilated (trained on synthetic signals)",
        partial(_seeded, nets.AudioConv1d), (ZooInput("waveform", ["batch", 1, "time"]),), ("logits",),
        "classification", data.signals, TrainSpec(epochs=10), True, CLASSIFIER_INT8,
        check_shapes=({"batch": 2, "time": 128}, {"batch": 4, "time": 512}), evaluation_samples=256,
    ),
    ZooModel(
        "multi_head", "Multi-output heads: logits + L2 embedding + regression (trained on digits)",
        partial(_seeded, nets.MultiHead), IMAGE, ("logits", "embedding", "ink"), "classification",
        data.digits_images, TrainSpec(loss="ce+ink", epochs=25), True, CLASSIFIER_INT8,
        # ink is one number per sample: its cosine is only a sign test, so it is judged on SNR.
        outputs={
            "embedding": {"int8": {"min_cosine": 0.99}},
            "ink": {"int8": {"min_cosine": -1.0, "min_snr_db": 20.0}},
        },
    ),
]

#: Every zoo model by name, in catalogue order.
ZOO: dict[str, ZooModel] = {entry.name: entry for entry in _ENTRIES}


def build(name: str) -> nn.Module:
    """The job factory: the zoo model ``name`` as built (random init, seed 0), in eval mode.

    Trained models get their weights from the job's ``weights`` file (see :func:`weights`).
    """
    return ZOO[name].make().eval()


def weights(name: str) -> tuple[Path, dict[str, float]] | None:
    """The trained weights of ``name`` (trained now at first use, cached after), or ``None`` when
    the model is converted with random weights; with the training summary."""
    entry = ZOO[name]
    if entry.train is None:
        return None
    return trained_weights(name, entry.make, entry.input_names, entry.split, entry.train)


def load(name: str) -> nn.Module:
    """The zoo model ``name`` ready to convert: built, with its trained weights when it has some."""
    from safetensors.torch import load_file

    model = build(name)
    found = weights(name)
    if found is not None:
        model.load_state_dict(load_file(str(found[0])), strict=True)
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
