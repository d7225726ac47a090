"""What the distill stage did, as a record for the manifest and the parity report."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")


class EpochRecord(_Record):
    """One epoch of training.

    Attributes:
        epoch: 1-based epoch number.
        learning_rate: The learning rate the epoch ran at.
        train_loss: Mean training loss over the epoch's samples.
        score: The held-out metric after the epoch (see `DistillationSummary.metric`).
        seconds: Wall time of the epoch, evaluation included.
    """

    epoch: int
    learning_rate: float
    train_loss: float
    score: float
    seconds: float


def best_epochs(history: list[EpochRecord]) -> tuple[int, int]:
    """The epoch to keep and the epoch the best score was first reached.

    The kept epoch is the last one with the best score: on a small held-out set the score often
    stops at a ceiling (100% of 144 images) while the loss still falls, and a later epoch with the
    same score has trained longer. Patience counts from the first epoch that reached the score.
    """
    best = max(record.score for record in history)
    tied = [record.epoch for record in history if record.score == best]
    return tied[-1], tied[0]


class ModelSize(_Record):
    """Size and speed of one PyTorch model.

    Attributes:
        parameters: Trainable and frozen parameter elements.
        state_bytes: Bytes of the state dict (parameters and buffers) as stored.
        latency_ms: Median PyTorch CPU time of one forward pass on the example batch.
        score: The held-out metric (teacher: against the labels, or 1.0 for the teacher-agreement metric).
    """

    parameters: int
    state_bytes: int
    latency_ms: float
    score: float


class DistillationSummary(_Record):
    """Teacher vs student and how the student was trained.

    Attributes:
        student: The student factory.
        loss: The loss used (kd, mse or cosine).
        temperature: T of kd.
        alpha: Label weight of kd (None: no labels, or not kd).
        metric: What `score` measures on the held-out data: ``accuracy`` (top-1 against labels) or
            ``cosine`` (mean cosine of the student's outputs to the teacher's).
        validation: The held-out data the metric, best epoch and early stop used.
        teacher: Teacher size, speed and score.
        student_model: Student size, speed and score (the best epoch's weights).
        batch_shape: Input shapes the latency was timed at.
        epochs_planned: The job's epochs.
        best_epoch: The epoch whose weights the student keeps.
        stopped_early: Training stopped because the metric stopped improving.
        resumed_from: The checkpoint epoch a run continued from (None: trained from the start).
        history: Every epoch, including those of interrupted runs resumed from.
        checkpoints: The checkpoint folder.
        notes: Caveats (e.g. early stopping chose on the evaluation data).
    """

    student: str
    loss: str
    temperature: float
    alpha: float | None
    metric: str
    validation: str
    teacher: ModelSize
    student_model: ModelSize
    batch_shape: dict[str, list[int]]
    epochs_planned: int
    best_epoch: int
    stopped_early: bool
    resumed_from: int | None
    history: list[EpochRecord]
    checkpoints: str
    notes: list[str] = []

    def format_score(self, value: float) -> str:
        """A held-out score of this summary's metric, as shown."""
        return format_score(self.metric, value)


def format_score(metric: str, value: float) -> str:
    """A held-out score as shown: accuracy in percent, cosine as a number."""
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"
