"""Building and combining losses: :func:`build_loss` (one registered loss with its options checked),
:class:`WeightedLoss` (the weighted sum the trainer optimises), :func:`build_stage_loss` (a recipe stage's
objective) and the static checks of what a stage's losses need (:func:`stage_needs`, :func:`check_needs`)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from vldistill.config import ConfigError, StageConfig
from vldistill.outputs import Dims, StepOutputs

from .base import LOSSES, Loss


def loss_options(name: str) -> list[str]:
    """The option names a registered loss accepts (its constructor's keyword arguments besides ``dims``)."""
    params = inspect.signature(LOSSES.get(name)).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name != "dims"]


def build_loss(name: str, dims: Dims, **options: Any) -> Loss:
    """Build the registered loss ``name`` with recipe ``options``.

    Raises:
        KeyError: unknown loss name (the message lists the registered losses).
        ValueError: an option the loss does not take (the message lists those it does), or a bad option value (the
            message names the loss, the key, the value and what is allowed).
    """
    cls = LOSSES.get(name)
    allowed = loss_options(name)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    unknown = [key for key in options if key not in allowed]
    if unknown and not takes_any:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"allowed options: {', '.join(allowed) or '(none)'}"
        )
    try:
        return cls(dims, **options)
    except ValueError as err:
        raise ValueError(f"loss {name!r}: {err}") from err


class WeightedLoss(nn.Module):
    """The objective the trainer optimises: ``sum_k w_k L_k`` over labelled terms.

    Attributes:
        terms: the ``(label, weight, loss)`` triples, in order.
        losses: the same losses by label, registered as submodules: their adapters and scales are in
            ``parameters()`` and in the state dict as ``losses.<label>.<name>``, e.g.
            ``losses.fd_image.adapters.0.weight``.

    Args:
        terms: ``(label, weight, loss)`` triples, e.g. ``("fd_image", 2000.0, fd)``. Labels are unique, non-empty,
            contain neither ``.`` nor ``/`` and are not ``loss`` (the key of the total in the logs).
    """

    def __init__(self, terms: Sequence[tuple[str, float, Loss]]):
        super().__init__()
        if not terms:
            raise ValueError("WeightedLoss needs at least one term")
        self.losses = nn.ModuleDict()
        self.terms: list[tuple[str, float, Loss]] = []
        for label, weight, loss in terms:
            if not isinstance(label, str) or not label or "." in label or "/" in label or label == "loss":
                raise ValueError(
                    f"term label {label!r} is not allowed: it must be non-empty, without '.' or '/', and not 'loss'"
                )
            if label in self.losses:
                raise ValueError(f"term label {label!r} is used twice; labels must be unique")
            if not isinstance(loss, Loss):
                raise ValueError(f"term {label!r}: {type(loss).__name__} is not a vldistill Loss")
            try:
                self.losses[label] = loss
            except KeyError as err:  # a label that clashes with a ModuleDict attribute, e.g. "items"
                raise ValueError(f"term label {label!r} is not allowed: {err}") from err
            self.terms.append((label, float(weight), loss))

        ratios: set[float] = set()
        for label, _, loss in self.terms:
            if "masked_image" in loss.needs:
                if not isinstance(getattr(loss, "mask_ratio", None), float | int):
                    raise ValueError(f"term {label!r} needs 'masked_image' but has no numeric mask_ratio attribute")
                ratios.add(float(loss.mask_ratio))
        ordered = sorted(ratios)
        if len(ordered) > 1:
            raise ValueError(
                f"the terms mask the student's image with different mask_ratio values {ordered}; the trainer computes "
                "one masked view per step, so give them the same mask_ratio"
            )
        self.mask_ratio: float | None = ordered[0] if ordered else None
        """The mask ratio of the terms that need ``"masked_image"`` (``None`` when none does)."""

    @property
    def needs(self) -> frozenset[str]:
        """Union of the terms' needs."""
        return frozenset().union(*(loss.needs for _, _, loss in self.terms))

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, float]]:
        """Returns the weighted total and logs: ``<label>`` (unweighted), ``<label>/<part>`` and ``loss`` (total)."""
        total: Tensor | None = None
        logs: dict[str, float] = {}
        for label, weight, loss in self.terms:
            value, parts = loss(out)
            total = weight * value if total is None else total + weight * value
            logs[label] = float(value.detach())
            logs.update({f"{label}/{part}": float(v) for part, v in parts.items()})
        assert total is not None  # terms is non-empty
        logs["loss"] = float(total.detach())
        return total, logs


# --------------------------------------------------------------------------------------------- stages
def build_stage_loss(stage: StageConfig, dims: Dims, stage_index: int) -> WeightedLoss:
    """Build a stage's weighted loss; errors name the recipe key of the offending term."""
    terms = []
    for j, term in enumerate(stage.losses):
        key = f"stages.{stage_index}.losses.{j}"
        try:
            loss = build_loss(term.name, dims, **term.options)
        except KeyError as err:
            raise ConfigError(f"{key}.name: {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key} ({term.name}): {err}") from None
        if "teacher" in loss.needs and not dims.teachers:
            raise ConfigError(f"{key}: loss {term.name!r} needs a teacher, but the recipe has none (set teacher:)")
        terms.append((term.label or _label(term.name, term.options), term.weight, loss))
    labels = [t[0] for t in terms]
    dupes = {lab for lab in labels if labels.count(lab) > 1}
    if dupes:
        raise ConfigError(f"stages.{stage_index}: several loss terms are labelled {sorted(dupes)}; give each a label")
    return WeightedLoss(terms)


def _label(name: str, options: dict[str, Any]) -> str:
    parts = [name] + [str(options[k]) for k in ("tower", "lang") if k in options]
    return "_".join(parts).replace(".", "_")  # a field such as texts.en: labels hold no '.'


def stage_needs(stage: StageConfig, stage_index: int) -> list[tuple[str, frozenset[str]]]:
    """Each term's needs, declared statically (nothing is built): ``[(recipe key, needs), ...]``."""
    out = []
    for j, term in enumerate(stage.losses):
        key = f"stages.{stage_index}.losses.{j}"
        try:
            cls = LOSSES.get(term.name)
        except KeyError as err:
            raise ConfigError(f"{key}.name: {err.args[0]}") from None
        out.append((f"{key} ({term.name})", cls.needs_for(**term.options)))
    return out


def check_needs(
    stages: Sequence[StageConfig], provides: frozenset[str], kind: str, student_outputs: frozenset[str]
) -> None:
    """Fail before training when a loss needs an output that the student kind does not provide.

    Args:
        stages: the recipe's stages.
        provides: what the student kind's ``forward`` can fill.
        kind: the student kind's name (for the message).
        student_outputs: the names that are student outputs (``vldistill.students.STUDENT_OUTPUTS``); other
            needs (``teacher``) are checked against the teacher source.
    """
    for i, stage in enumerate(stages):
        for key, needs in stage_needs(stage, i):
            missing = sorted((needs & student_outputs) - provides)
            if missing:
                raise ConfigError(
                    f"{key}: needs {', '.join(map(repr, missing))} from the student, which a {kind} student does not "
                    f"provide (it provides: {', '.join(sorted(provides))})"
                )


def check_unpaired(stages: Sequence[StageConfig]) -> None:
    """Fail before training when a stage that draws unpaired images and captions (``samples: all``) has a loss that
    compares an image with a text: such a stage would learn from pairings the run may not use."""
    for i, stage in enumerate(stages):
        if stage.samples != "all":
            continue
        for j, term in enumerate(stage.losses):
            try:
                cls = LOSSES.get(term.name)
            except KeyError as err:
                raise ConfigError(f"stages.{i}.losses.{j}.name: {err.args[0]}") from None
            if cls.pairs_image_text:
                raise ConfigError(
                    f"stages.{i}.losses.{j} ({term.name}): compares images with texts, but stages.{i}.samples is "
                    "'all' (images and captions used as unpaired data); use it in a stage with samples: paired, or "
                    "use only unimodal losses (fd, mfd, xling) here"
                )
