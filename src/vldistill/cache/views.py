"""Augmented views: K random resized crops / flips per image, drawn once, stored, and replayed on the student.

With ``cache.views: K > 1``, each image gets K views whose parameters are drawn from (seed, sample digest, view) and
*stored* in the cache; training picks a view per sample and epoch (every view once per K epochs, see
``StageSampler``) and the collator applies the stored parameters to the student's image, so the teacher's target is
always for the view the student sees.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from ..config import CacheConfig


def augmentation_settings(options: CacheConfig) -> dict[str, Any]:
    """The settings that define the cached views (only ``views`` when there is one view: no augmentation)."""
    if options.views == 1:
        return {"views": 1}
    return {"views": options.views, "crop_scale": list(options.crop_scale), "flip": options.flip, "seed": options.seed}


def sample_view(digest: bytes, view: int, aug: dict[str, Any]) -> list[float]:
    """Parameters ``[x0, y0, x1, y1, flip]`` of one random resized crop (area fraction in ``crop_scale``, aspect
    ratio in [3/4, 4/3]) and flip, drawn from (seed, sample digest, view)."""
    rng = random.Random(hashlib.blake2b(digest + f":{aug['seed']}:{view}".encode(), digest_size=16).digest())
    area = rng.uniform(*aug["crop_scale"])
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
    x0, y0 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
    flip = 1.0 if aug["flip"] and rng.random() < 0.5 else 0.0
    return [x0, y0, x0 + w, y0 + h, flip]


def view_params(digests: np.ndarray, aug: dict[str, Any]) -> np.ndarray | None:
    """``[N, K, 5]`` float32: the views of every row (``None`` without augmentation)."""
    if aug["views"] == 1:
        return None
    params = [[sample_view(d.tobytes(), v, aug) for v in range(aug["views"])] for d in digests]
    return np.asarray(params, dtype=np.float32)  # float32 first: the build applies exactly what training replays


def apply_view(image: Image.Image, params: Sequence[float] | Tensor | np.ndarray) -> Image.Image:
    """Crop the relative box ``params[:4]`` out of ``image`` and flip it horizontally when ``params[4] >= 0.5``."""
    x0, y0, x1, y1, flip = (float(p) for p in params)
    width, height = image.size
    left, top = min(round(x0 * width), width - 1), min(round(y0 * height), height - 1)
    right, bottom = max(left + 1, round(x1 * width)), max(top + 1, round(y1 * height))
    out = image.crop((left, top, min(right, width), min(bottom, height)))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip >= 0.5 else out


class ViewTable:
    """Stored view parameters ``[N, K, 5]`` of every training row: the collator replays them on the student."""

    def __init__(self, params: Tensor):
        self.params = params

    @property
    def count(self) -> int:
        return self.params.shape[1]

    def apply(self, image: Image.Image, index: int, view: int) -> Image.Image:
        return apply_view(image, self.params[index, view].tolist())
