"""Pipeline stages, one module each; `STAGES` is the order the runner runs them in.

A new stage is a module here with a class satisfying `pipeline.stages.base.Stage`, listed in
`STAGES`: the runner checks its preconditions in preflight and runs it, without knowing it.
"""

from pipeline.stages.base import Stage
from pipeline.stages.distill import DistillStage
from pipeline.stages.export import ExportStage
from pipeline.stages.hls import HlsStage
from pipeline.stages.prune import PruneStage
from pipeline.stages.quantize import QuantizeStage
from pipeline.stages.simplify import SimplifyStage
from pipeline.stages.validate import ValidateStage

STAGES: tuple[Stage, ...] = (
    DistillStage(),
    ExportStage(),
    SimplifyStage(),
    PruneStage(),
    QuantizeStage(),
    HlsStage(),
    ValidateStage(),
)

__all__ = ["STAGES", "Stage"]
