"""Task and distillation losses, one :data:`LOSSES` registry entry each.

Every loss reads one :class:`~vldistill.outputs.StepOutputs` and returns ``(scalar, parts)``, where ``parts`` are
named, detached tensors for logging. A recipe names losses and their options; :func:`build_loss` builds one and
checks the options, and :class:`WeightedLoss` is the weighted sum the trainer optimises.

Learnable state that exists only for distillation (adapters from student to teacher width, the losses' own logit
scales) lives in the loss modules, so it is saved with the training run and never with the exported student. The
trainer must hand ``WeightedLoss.parameters()`` to its optimiser along with the student's.

Modules: :mod:`~vldistill.losses.base` (the registry, the :class:`Loss` base class, option checks and shared
building blocks), :mod:`~vldistill.losses.contrastive` (``clip``, ``crd``, ``soft_ce``, ``icl``),
:mod:`~vldistill.losses.features` (``fd``, ``mfd``, ``xling``), :mod:`~vldistill.losses.task` (``task``, ``lm``)
and :mod:`~vldistill.losses.combine` (building, weighting and checking a stage's losses). Importing this package
registers every loss, and everything public is importable from here.

Adding a loss is one decorated class::

    @LOSSES.register("my_loss")
    class MyLoss(Loss):
        needs = frozenset({"teacher", "image", "text"})

        def __init__(self, dims: Dims, alpha: float = 1.0): ...

        def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]: ...
"""

from .base import (
    ADAPTERS,
    DEFAULT_SCALE,
    LEVELS,
    LOSSES,
    MAX_SCALE,
    NORMS,
    TOWERS,
    Loss,
    contrastive_targets,
    distance,
    kl_to_logits,
    pool_teacher_grid,
    soft_cross_entropy,
)
from .clip_td import ClipTargetedDistillation as ClipTargetedDistillation  # registers clip_td (CLIP-TD)
from .combine import (
    WeightedLoss,
    build_loss,
    build_stage_loss,
    check_needs,
    check_unpaired,
    loss_options,
    stage_needs,
)
from .contrastive import ClipLoss, InteractiveContrastive, RelationalDistillation, SoftCrossEntropyDistillation
from .features import CrossLingualDistillation, FeatureDistillation, MaskedFeatureDistillation
from .task import LanguageModelLoss, TaskLoss
from .vlkd import TextTextDistance as TextTextDistance  # registers VLKD's ttdm, itcl, icti (losses/vlkd.py)

__all__ = [
    "ADAPTERS",
    "DEFAULT_SCALE",
    "LEVELS",
    "LOSSES",
    "MAX_SCALE",
    "NORMS",
    "TOWERS",
    "ClipLoss",
    "CrossLingualDistillation",
    "FeatureDistillation",
    "InteractiveContrastive",
    "LanguageModelLoss",
    "Loss",
    "MaskedFeatureDistillation",
    "RelationalDistillation",
    "SoftCrossEntropyDistillation",
    "TaskLoss",
    "WeightedLoss",
    "build_loss",
    "build_stage_loss",
    "check_needs",
    "check_unpaired",
    "contrastive_targets",
    "distance",
    "kl_to_logits",
    "loss_options",
    "pool_teacher_grid",
    "soft_cross_entropy",
    "stage_needs",
]
