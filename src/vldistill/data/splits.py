"""Training regimes as splits of the data: low-shot and domain shift (METHODS.md section 5).

Every split is a pure function of the data, the hold-out and a seed, so that every method compared trains and is
tested on the same items.

- :func:`low_shot`: a fixed fraction of the training items, drawn with a seed. The draw is a prefix of one seeded
  permutation, so with the same seed a smaller fraction gives a subset of a larger one.
- :func:`domain_shift`: training keeps only the items outside a held-out sub-distribution, the shifted test set
  only the items inside it. Two kinds of hold-out:

  - ``"combos"``: attribute combinations of the image, e.g. ``"red circle"``. A combination is whitespace-separated
    tokens, each an attribute value (``red``) or ``key=value`` (``color=red``); an item is held out when every token
    matches one of its ``attributes``. Every item needs attributes (bundled data has ``color`` and ``shape``;
    manifests give them in an ``attributes`` column).
  - ``"phrasings"``: question (or hypothesis) phrasings, as shell-style patterns matched against the whole text,
    case-insensitively (``*`` any text, ``?`` one character), e.g. ``"what is the color of the *"``.

  Default hold-outs (no ``hold_out`` given) are those of the bundled easy-VQA data
  (:data:`~vldistill.data.easyvqa_tasks.HELD_OUT_COMBOS`: red circle, green rectangle, blue triangle, gray circle,
  about 16% of the images, every colour and shape still in training; and
  :data:`~vldistill.data.easyvqa_tasks.HELD_OUT_PHRASINGS`: one phrasing of each question form that has several).

:class:`SplitConfig` names a regime and :func:`apply_split` applies it: the domain shift first, then the low-shot
draw from what training keeps.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import TypeVar

from vldistill.config import DOMAIN_SHIFTS, SplitConfig
from vldistill.data.easyvqa_tasks import HELD_OUT_COMBOS, HELD_OUT_PHRASINGS
from vldistill.data.pairs import DataError, PairDataset
from vldistill.data.tasks import TaskDataset, TaskSample

__all__ = [
    "DOMAIN_SHIFTS",
    "SplitConfig",
    "apply_split",
    "default_hold_out",
    "domain_shift",
    "low_shot",
    "paired_indices",
]

D = TypeVar("D", TaskDataset, PairDataset)


def low_shot(dataset: D, fraction: float, seed: int) -> D:
    """A fixed fraction of the items, drawn with a seed, in their original order.

    Keeps ``max(1, round(fraction * len(dataset)))`` items: the first of a permutation seeded by ``seed``, so the same
    seed gives the same items and a smaller fraction a subset of a larger one.

    Args:
        dataset: a :class:`TaskDataset` or :class:`~vldistill.data.pairs.PairDataset`.
        fraction: in (0, 1].
        seed: seeds the draw.

    Raises:
        ValueError: the fraction is not in (0, 1].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"low_shot fraction = {fraction!r}: must be a number in (0, 1]")
    order = list(range(len(dataset)))
    random.Random(f"low-shot:{seed}").shuffle(order)
    keep = sorted(order[: max(1, round(fraction * len(order)))])
    return _subset(dataset, keep)


def _subset(dataset: D, indices: list[int]) -> D:
    if isinstance(dataset, TaskDataset):
        return dataset.subset(indices)
    if isinstance(dataset, PairDataset):
        # PairDataset has no subset(); a shallow copy keeps its checked samples and any preloaded images.
        new = copy.copy(dataset)
        new.samples = [dataset.samples[i] for i in indices]
        if getattr(dataset, "_images", None) is not None:
            new._images = [dataset._images[i] for i in indices]
        new.total, new.skipped, new.skipped_reasons = len(indices), 0, []
        return new
    raise TypeError(f"expected a TaskDataset or PairDataset, got {type(dataset).__name__}")


def default_hold_out(by: str, kind: str) -> list[str]:
    """The default hold-out of the bundled easy-VQA data for a domain shift ``by`` and a task kind."""
    if by not in DOMAIN_SHIFTS:
        raise ValueError(f"domain_shift = {by!r}: must be one of {', '.join(DOMAIN_SHIFTS)}")
    return list(HELD_OUT_COMBOS) if by == "combos" else list(HELD_OUT_PHRASINGS.get(kind, ()))


def domain_shift(
    train: TaskDataset,
    test: TaskDataset | None,
    by: str = "combos",
    hold_out: Sequence[str] | None = None,
) -> tuple[TaskDataset, TaskDataset | None]:
    """Holds a sub-distribution out of training and tests on it alone.

    Args:
        train: training items; those matching the hold-out are dropped.
        test: test items; only those matching the hold-out are kept (None: only ``train`` is filtered).
        by: ``"combos"`` (attribute combinations of the image) or ``"phrasings"`` (question/hypothesis patterns).
        hold_out: the combinations or patterns (see the module docstring); None or empty: the bundled data's
            default for ``by`` and the data's kind (:func:`default_hold_out`).

    Returns:
        (training items outside the hold-out, test items inside it), each in its original order.

    Raises:
        ValueError: ``by`` is unknown or a hold-out string is malformed.
        DataError: an item has no attributes to match (``combos``), or a side would be empty.
    """
    values = list(hold_out) if hold_out else default_hold_out(by, train.kind)
    held = _matcher(by, values)
    sides = {"train": train, "test": test}
    matches = {
        name: [held(sample, data.source) for sample in data.samples] for name, data in sides.items() if data is not None
    }
    used = {value for per_item in matches.values() for hits in per_item for value in hits}
    if unused := [value for value in values if value not in used]:
        warnings.warn(f"domain_shift by {by}: hold-out {unused} matches no item of train or test", stacklevel=2)
    kept_train = [i for i, hits in enumerate(matches["train"]) if not hits]
    if not kept_train:
        raise DataError(
            f"{train.source or 'train'}: domain_shift by {by} with hold-out {values} leaves no training item"
        )
    if test is None:
        return train.subset(kept_train), None
    kept_test = [i for i, hits in enumerate(matches["test"]) if hits]
    if not kept_test:
        raise DataError(
            f"{test.source or 'test'}: no test item matches the {by} hold-out {values} (the defaults are for the "
            f"bundled easy-VQA data; give hold_out for other data)"
        )
    return train.subset(kept_train), test.subset(kept_test)


def _matcher(by: str, values: list[str]) -> Callable[[TaskSample, str], list[str]]:
    """A function from a sample to the hold-out values it matches."""
    if by not in DOMAIN_SHIFTS:
        raise ValueError(f"domain_shift = {by!r}: must be one of {', '.join(DOMAIN_SHIFTS)}")
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"hold_out value {value!r}: must be a non-empty string")
    if by == "phrasings":
        patterns = [(value, value.strip().lower()) for value in values]
        return lambda sample, source: [v for v, p in patterns if fnmatchcase(sample.text.strip().lower(), p)]
    combos = [(value, [_token(token) for token in value.split()]) for value in values]

    def match(sample: TaskSample, source: str) -> list[str]:
        attributes = sample.attributes
        if not attributes:
            where = sample.origin or source or "an item"
            raise DataError(
                f"{where}: no attributes; a domain shift by combos needs them on every item "
                f'(an \'attributes\' column, e.g. {{"color": "red", "shape": "circle"}})'
            )
        return [value for value, tokens in combos if all(_token_matches(t, attributes) for t in tokens)]

    return match


def _token(token: str) -> tuple[str | None, str]:
    key, sep, value = token.partition("=")
    return (key, value) if sep else (None, token)


def _token_matches(token: tuple[str | None, str], attributes: dict[str, str]) -> bool:
    key, value = token
    return attributes.get(key) == value if key is not None else value in attributes.values()


def apply_split(cfg: SplitConfig, train: D, test: D | None) -> tuple[D, D | None]:
    """Applies a regime: the domain shift (if any) to both sides, then the low-shot draw (if any) to training.

    Args:
        cfg: the regime.
        train: training items.
        test: test items, or None.

    Returns:
        (training items, test items).
    """
    if cfg.domain_shift is not None:
        if not isinstance(train, TaskDataset) or not (test is None or isinstance(test, TaskDataset)):
            raise TypeError(f"domain_shift needs task data (TaskDataset), got {type(train).__name__}")
        train, test = domain_shift(train, test, by=cfg.domain_shift, hold_out=cfg.hold_out or None)
    if cfg.low_shot is not None:
        train = low_shot(train, cfg.low_shot, cfg.seed)
    return train, test


def paired_indices(n: int, paired: float | None, seed: int) -> list[int]:
    """The training samples whose image-caption pairing a run may use (``data.paired``): a count (> 1) or a fraction
    in (0, 1] of ``n``, drawn with ``seed`` like :func:`low_shot` (the same seed gives the same samples; a smaller
    count gives a subset of a larger one), in their original order; ``None``: all."""
    if paired is None:
        return list(range(n))
    count = int(paired) if paired > 1 else max(1, round(paired * n))
    if count > n:
        raise DataError(f"data.paired = {paired!r}: the training data has only {n} samples")
    order = list(range(n))
    random.Random(f"low-shot:{seed}").shuffle(order)
    return sorted(order[:count])
