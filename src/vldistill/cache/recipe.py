"""A recipe's cache: its directory, its teachers' identities and text fields, building it and opening it for a run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, RecipeConfig
from ..losses import stage_needs
from ..models import Teacher
from ..outputs import ModelDims
from .build import build_cache
from .fingerprint import dataset_fields
from .identity import teacher_identity
from .read import CachedTeachers


def recipe_cache_dir(cfg: RecipeConfig, directory: str | os.PathLike | None = None) -> Path:
    """The one cache directory of a recipe's teachers (``teachers.N.cache``), or ``directory`` when given."""
    if directory is not None:
        return Path(directory)
    paths = {t.cache for t in cfg.teachers}
    if not cfg.teachers or None in paths:
        k = next((i for i, t in enumerate(cfg.teachers) if t.cache is None), 0)
        raise ConfigError(f"teachers.{k}.cache is not set: give the cache directory (or --output DIR)")
    if len(paths) > 1:
        raise ConfigError(f"teachers.N.cache: all teachers of a recipe share one cache directory, got {sorted(paths)}")
    return Path(paths.pop())


def recipe_fields(cfg: RecipeConfig, dataset, teachers: Sequence[Teacher] | None = None) -> list[list[str]]:
    """Per teacher, the text fields it embeds (what the live trainer gives it): for image-text pairs, the recipe's
    caption languages (``data.languages``) that the teacher understands (``teachers.N.languages``); for task samples,
    every field of the first sample's :func:`~vldistill.batching.teacher_texts` (:func:`.dataset_fields`)."""
    task = dataset_fields(dataset)
    if task is not None:
        return [list(task) for _ in cfg.teachers]
    langs = [getattr(t, "languages", None) for t in teachers] if teachers else [t.languages for t in cfg.teachers]
    return [[lang for lang in cfg.data.languages if lang in (mine or ["en"])] for mine in langs]


def recipe_identities(cfg: RecipeConfig, teachers: Sequence[Teacher] | None = None) -> list[dict[str, Any]]:
    """Each teacher's identity: from the loaded teachers when given, else from the recipe (no model loaded)."""
    if teachers:
        return [teacher_identity(t, tc.name_or_path, tc.revision) for t, tc in zip(teachers, cfg.teachers, strict=True)]
    return [teacher_identity(None, tc.name_or_path, tc.revision, tc.dtype, tc.trust_remote_code) for tc in cfg.teachers]


def recipe_needs_tokens(cfg: RecipeConfig, dims: Sequence[ModelDims]) -> bool:
    """Whether any loss of the recipe reads token features."""
    needs = frozenset().union(*(n for i, s in enumerate(cfg.stages) for _, n in stage_needs(s, i)))
    return bool(needs & {"image_tokens", "text_tokens", "teacher_image_tokens"})


def build_recipe_cache(
    cfg: RecipeConfig,
    teachers: Sequence[Teacher],
    dataset,
    directory: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool | None = None,
    pad_bytes: int = 0,
    replace: bool = False,
) -> dict[str, Any]:
    """Build (or resume, or reuse and repair) the cache of a recipe's teachers on its training data; ``rebuild``
    and ``replace`` as in :func:`~vldistill.cache.build_cache`."""
    if len(teachers) != len(cfg.teachers):
        raise ConfigError(f"teachers: the recipe has {len(cfg.teachers)}, {len(teachers)} were given")
    options = cfg.cache
    if not options.tokens and recipe_needs_tokens(cfg, [t.dims for t in teachers]):
        options = dataclasses.replace(options, tokens=True)
    return build_cache(
        recipe_cache_dir(cfg, directory),
        teachers,
        dataset,
        recipe_fields(cfg, dataset, teachers),
        recipe_identities(cfg, teachers),
        options,
        rebuild=rebuild,
        progress=cfg.train.progress if progress is None else progress,
        pad_bytes=pad_bytes,
        replace=replace,
    )


def open_recipe_cache(cfg: RecipeConfig, dataset, teachers: Sequence[Teacher] | None = None) -> CachedTeachers:
    """The :class:`CachedTeachers` of a recipe whose teachers say ``source: cache``, checked against the recipe
    (and against ``teachers`` when they are loaded: their weights are then compared too)."""
    return CachedTeachers(
        recipe_cache_dir(cfg),
        dataset,
        recipe_identities(cfg, teachers),
        recipe_fields(cfg, dataset, teachers),
        cfg.cache,
    )
