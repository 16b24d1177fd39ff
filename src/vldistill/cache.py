"""Teacher-output cache: run the teachers once over a dataset, then distil many times at the speed of the student.

:func:`build_cache` (``vldistill cache``) runs every teacher of a recipe once over the training set and stores what
losses read from a teacher (:class:`~vldistill.outputs.Embeddings`): pooled image and text embeddings, optionally
token features, optionally for K augmented views of each image. A recipe whose teachers say ``source: cache`` then
trains through :class:`CachedTeachers`, a drop-in ``TeacherSource``: no teacher forward in the training step.

A cache is a directory::

    manifest.json               what was cached, from what and how; the complete shards; ``complete: true`` at the end
    shard-00000.safetensors     rows [0, S) of the dataset
    shard-00001.safetensors     rows [S, 2S), ...

A shard of ``n`` rows holds (``k``: teacher number, ``K``: views, ``lang``: caption language)::

    row_key                  [n, 16] uint8   content digest of the sample (see "Dataset fingerprint")
    views                    [n, K, 5] f32   crop box (x0, y0, x1, y1, relative to the image) and flip, K > 1 only
    t{k}.image               [n, K, d]       pooled image embedding of each view
    t{k}.text.{lang}         [n, d]          pooled text embedding
    t{k}.image_tokens        [n, K, T, h]    token features, with ``cache.tokens`` only
    t{k}.text_tokens.{lang}  [n, L, h]       padded with zeros to the teacher's max length L, with ``cache.tokens``
    t{k}.text_mask.{lang}    [n, L] uint8

**Why safetensors shards rather than Arrow through** ``datasets``: every column is a fixed-shape tensor, which
safetensors stores raw in float32, float16 or bfloat16 (Arrow has no bfloat16). A random training batch is then one
numpy fancy-index per shard into a read-only memory map of the file, with no conversion from Arrow list arrays and
nothing loaded that the batch does not touch (mapped pages are handed back to the kernel every
:data:`RELEASE_BYTES` read, so the resident memory stays bounded however large the cache). A shard is one file
written once (temporary name, then ``os.replace``): a killed build leaves whole shards and a manifest listing them,
so resuming is "start after the last listed shard". And it adds no dependency: the project already stores weights
in safetensors.

**Several teachers, added later.** A cache holds one set of ``t{k}.*`` columns per teacher; a run reads the columns of
its own teachers, matched by identity (so a cache of teachers A and B serves a recipe of B alone, or of B and A). A
build for a teacher the cache lacks (same data and settings) adds its columns to every shard without running the
cached teachers again, on the stored views; until the last shard is rewritten the manifest says ``extending`` and the
cache is not used. The row digests never change, so a new teacher may read only the caption languages they cover.

**Identity checks.** The manifest records, per teacher: its id (hub id or resolved directory) and revision, a
SHA-256 of its weights (state dict) and, when it was loaded from a directory or the local hub cache, of its weight
files and ``config.json``; a hash of its processor (the tokenizer's full ``tokenizer.json`` and padding side, the
image processor's ``to_dict()``); its dtype and caption languages. Also the dataset fingerprint, the augmentation
settings, the storage dtype and the vldistill version. Opening a cache for a run compares each of them (the weights
by whichever hash both sides have; the id and revision only when neither hash can be computed) and raises
:class:`CacheError` naming the first field that differs.

**Dataset fingerprint.** Each sample's digest is a BLAKE2b-128 of its image *content* (the file's bytes, or the
in-memory bytes or pixels) and of its captions in the cached languages; the fingerprint is a SHA-256 of the digests
in order. Content, not paths and modification times: a copied dataset still matches, a changed image does not. It
costs one read of every image file (no decoding). Cached rows are found by digest, so a cache also serves a subset or
a reordering of the data it was built on; a sample with no cached row is refused (with the count).

**Augmented views.** With ``cache.views: K > 1``, each image gets K random resized crops / horizontal flips whose
parameters are drawn from (seed, sample digest, view) and *stored*; training picks a view per sample and epoch
(every view once per K epochs, see ``StageSampler``) and the collator applies the stored parameters to the student's
image, so the teacher's target is always for the view the student sees.

This module sits beside the trainer (it reuses the trainer's preprocessing and ``encode_batch``, so a cached output
is exactly what the live teacher would give); nothing in the library imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import random
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .config import CacheConfig, ConfigError, RecipeConfig
from .models import DualEncoder, Teacher
from .outputs import Dims, Embeddings, ModelDims
from .trainer import _Processor, build_stage_loss, encode_batch

FORMAT = "vldistill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 256 << 20
"""Target size of one shard when ``cache.shard_rows`` is not set."""
RELEASE_BYTES = 256 << 20
"""Mapped cache pages are released (``madvise(MADV_DONTNEED)``) after this many bytes were read."""

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8, "I64": np.int64}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(ValueError):
    """A teacher cache that is missing, incomplete, or does not match the run. The message names the field."""


# ------------------------------------------------------------------------------------------------- identity
def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def files_digest(name_or_path: str | os.PathLike, revision: str | None = None) -> str | None:
    """SHA-256 of the weight files and ``config.json`` of a model directory (or of its snapshot in the local hub
    cache); ``None`` when there is no such directory here."""
    path = Path(name_or_path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=True))
        except (OSError, ValueError, ImportError):  # not a hub id, or not in the local cache: nothing to hash
            return None
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(16 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def processor_digest(tokenizer, image_processor) -> str:
    """Hash of what preprocessing depends on: the tokenizer (its full ``tokenizer.json``: vocabulary, normaliser,
    special tokens) and padding side, and the image processor's settings (size, crop, mean, std, resampling)."""
    image = {
        k: v
        for k, v in image_processor.to_dict().items()
        if k not in ("image_processor_type", "processor_class", "_processor_class")  # the class, not the settings
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = json.loads(backend.to_str())
        for key in ("truncation", "padding"):  # the state left by the last call, not the tokenizer's definition
            text.pop(key, None)
    else:
        text = sorted(tokenizer.get_vocab().items())
    payload = {"image": image, "tokenizer": text, "padding_side": getattr(tokenizer, "padding_side", "right")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def teacher_identity(
    teacher: DualEncoder | None = None,
    name_or_path: str | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """What identifies a teacher's outputs, from a loaded teacher and/or its hub id or directory.

    Without ``teacher`` the model is not loaded: only its processor (to hash it) and, where they are on disk, its
    weight files (to hash them).
    """
    if teacher is None and not name_or_path:
        raise CacheError("a cached teacher needs its name_or_path (or the loaded teacher) to be checked")
    ident = str(name_or_path or (getattr(teacher.model, "name_or_path", "") if teacher else "") or "in-memory")
    if Path(ident).exists():
        ident = str(Path(ident).resolve())
    if teacher is not None:
        tokenizer, image_processor = teacher.tokenizer, teacher.image_processor
        dtype = str(next(teacher.model.parameters()).dtype).removeprefix("torch.")
    else:
        from transformers import AutoImageProcessor, AutoTokenizer

        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    return {
        "id": ident,
        "revision": revision,
        "weights": weights_digest(teacher.model) if teacher is not None else None,
        "files": files_digest(name_or_path, revision) if name_or_path else None,
        "processor": processor_digest(tokenizer, image_processor),
        "dtype": dtype or "float32",
    }


def augmentation_settings(options: CacheConfig) -> dict[str, Any]:
    """The settings that define the cached views (only ``views`` when there is one view: no augmentation)."""
    if options.views == 1:
        return {"views": 1}
    return {"views": options.views, "crop_scale": list(options.crop_scale), "flip": options.flip, "seed": options.seed}


# ------------------------------------------------------------------------------------------------- the data
def sample_digest(sample: Any, languages: Sequence[str]) -> bytes:
    """BLAKE2b-128 of a :class:`~vldistill.data.Sample`'s image content and its captions in ``languages``."""
    h = hashlib.blake2b(digest_size=16)
    data = getattr(sample, "data", None)
    if isinstance(data, bytes | bytearray):
        h.update(data)
    elif isinstance(data, Image.Image):
        h.update(f"{data.mode}{data.size}".encode())
        h.update(data.tobytes())
    else:
        with open(sample.image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    for lang in languages:
        h.update(b"\0" + lang.encode() + b"\0" + sample.captions[lang].encode())
    return h.digest()


def dataset_digests(dataset, languages: Sequence[str]) -> np.ndarray:
    """``[N, 16]`` uint8: the digest of every row of a :class:`~vldistill.data.PairDataset` (or any dataset of
    ``{"image", "captions"}`` items, whose decoded pixels are hashed)."""
    samples = getattr(dataset, "samples", None)
    missing = [lang for lang in languages if lang not in getattr(dataset, "languages", languages)]
    if missing:
        raise CacheError(f"languages: the cache has captions in {missing}, which the training data lacks")
    if samples is None:
        samples = [_ItemSample(dataset[i]) for i in range(len(dataset))]
    if len(samples) >= 256:  # hashing releases the GIL: threads pay off on many files
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda s: sample_digest(s, languages), samples))
    else:
        digests = [sample_digest(s, languages) for s in samples]
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(samples), 16).copy()


class _ItemSample:
    def __init__(self, item: dict[str, Any]):
        self.data, self.captions = item["image"], item["captions"]


def fingerprint(digests: np.ndarray) -> str:
    return hashlib.sha256(digests.tobytes()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------- augmentation
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


# ------------------------------------------------------------------------------------------------- building
class _BuildCollate:
    """Raw samples -> each teacher's inputs (the trainer's own preprocessing), each image in its K views."""

    def __init__(self, teachers: Sequence[DualEncoder], languages: Sequence[Sequence[str]], views: np.ndarray | None):
        self.processors = [_Processor(t) for t in teachers]
        self.languages = [list(langs) for langs in languages]
        self.views = views

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        if self.views is not None:
            images = [
                apply_view(img, p) for img, s in zip(images, samples, strict=True) for p in self.views[s["index"]]
            ]
        langs = sorted({lang for langs in self.languages for lang in langs})
        captions = {lang: [s["captions"][lang] for s in samples] for lang in langs}
        return {
            "index": torch.tensor([s["index"] for s in samples]),
            "teachers": [proc(images, captions, ls) for proc, ls in zip(self.processors, self.languages, strict=True)],
        }


def build_cache(
    directory: str | os.PathLike,
    teachers: Sequence[Teacher],
    dataset,
    languages: Sequence[Sequence[str]],
    identities: Sequence[dict[str, Any]] | None = None,
    options: CacheConfig | None = None,
    rebuild: bool = False,
    progress: bool = True,
    pad_bytes: int = 0,
) -> dict[str, Any]:
    """Run ``teachers`` once over ``dataset`` and write their outputs to a cache in ``directory``.

    A complete cache of the same data and settings is reused as it is when it holds every teacher (in any order); the
    teachers it lacks are added to it (only they run; each shard is rewritten with their columns). An interrupted
    build or addition is resumed from its last complete shard. A cache of other data or settings is refused.
    ``rebuild=True`` replaces a cache that differs in anything, teachers included, with one of exactly ``teachers``.

    Args:
        directory: the cache directory (created).
        teachers: the loaded teachers, in the recipe's order.
        dataset: the training data (a :class:`~vldistill.data.PairDataset`).
        languages: per teacher, the caption languages to embed.
        identities: per teacher, :func:`teacher_identity` (default: computed from ``teachers``).
        options: dtype, token features, views, batch size, workers, shard size.
        rebuild: replace an existing cache built from other teachers, data or settings.
        progress: show a progress bar (samples per second).
        pad_bytes: benchmarks only: this many extra bytes per row (a ``pad`` tensor no run reads).

    Returns:
        A summary: directory, rows, shards, bytes, rows built by this call, seconds and samples per second.
    """
    options = options or CacheConfig()
    directory = Path(directory)
    teachers = list(teachers)
    identities = list(identities) if identities is not None else [teacher_identity(t) for t in teachers]
    digest_langs = sorted({lang for langs in languages for lang in langs})
    digests = dataset_digests(dataset, digest_langs)
    header = _header(teachers, languages, identities, dataset, digests, digest_langs, options, pad_bytes)
    views = _view_params(digests, header["augmentation"])
    try:
        manifest = read_manifest(directory)
    except CacheError:
        if not rebuild:
            raise
        manifest = {}  # unreadable (another format): replaced below
    if manifest and rebuild and "extending" in manifest:  # an interrupted addition: replaced, never half-reused
        _clear(directory)
        manifest = None
    if manifest and not rebuild and (manifest.get("complete") or "extending" in manifest):
        added = _add_teachers(directory, manifest, header, teachers, dataset, digests, options)
        if added is not None and not callable(added):  # the same data and settings, every teacher cached: reuse
            return added
        if added is not None:  # the same data and settings: add the teachers it lacks
            summary = added(progress)
            held = read_manifest(directory)["teachers"]
            if all(_find_teacher(held, e, e["languages"]) is not None for e in header["teachers"]):
                return summary
            # that finished an interrupted addition; now add the rest
            return build_cache(directory, teachers, dataset, languages, identities, options, False, progress, pad_bytes)
    if manifest is not None:
        order = [k for k in header if k != "teachers"] + ["teachers"]  # name data and settings before teachers
        diff = _first_difference({k: manifest.get(k) for k in order}, {k: header[k] for k in order})
        if options.shard_rows is not None and diff is None and options.shard_rows != manifest["shard_rows"]:
            diff = ("shard_rows", manifest["shard_rows"], options.shard_rows)
        if diff is not None and not rebuild:
            field, old, new = diff
            raise CacheError(
                f"{directory} holds a cache built with other settings ({field}: {_short(old)} there, {_short(new)} "
                f"now); delete it, choose another directory, or rebuild it (--rebuild)"
            )
        if diff is not None:
            _clear(directory)
            manifest = None
    if manifest is not None and manifest["complete"]:
        return _summary(directory, manifest, 0, 0.0)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.tmp"):  # a shard being written when the last build was killed
        stale.unlink()
    if manifest is None:
        rows = options.shard_rows or _auto_shard_rows(
            teachers, dataset, header, _BuildCollate(teachers, languages, views)
        )
        manifest = {**header, "vldistill": __version__, "shard_rows": rows, "shards": [], "complete": False}
        _write_json(directory / MANIFEST, manifest)
    manifest["shards"] = _valid_prefix(directory, manifest["shards"])
    return _run_build(directory, teachers, dataset, languages, digests, views, manifest, options, progress)


def _add_teachers(directory, manifest, header, teachers, dataset, digests, options):
    """A complete cache of the same data and settings: reuse it when it holds every teacher asked for, or return a
    function that adds the missing ones. ``None`` when the data or settings differ (the caller refuses or rebuilds).

    Adding computes only the new teachers' outputs (on the stored views) and rewrites each shard with their columns
    appended (temporary file, then rename); the cache is marked incomplete until the last shard is done, and a killed
    addition resumes from the first shard not yet rewritten. A new teacher may read only caption languages the
    cache's row digests cover (``dataset.languages``): the digests, and so the cache's identity, never change."""
    rest = {k: v for k, v in header.items() if k not in ("teachers", "dataset")}
    if _first_difference({k: manifest.get(k) for k in rest}, rest) is not None:
        return None
    if options.shard_rows is not None and options.shard_rows != manifest["shard_rows"]:
        return None
    old, wanted = manifest["dataset"], header["dataset"]
    if {k: v for k, v in old.items() if k not in ("fingerprint", "languages")} != {
        k: v for k, v in wanted.items() if k not in ("fingerprint", "languages")
    }:
        return None
    known = old["languages"]
    try:
        row_keys = digests if known == wanted["languages"] else dataset_digests(dataset, known)
    except CacheError:
        return None  # the data lacks captions the cache fingerprinted: other data
    if fingerprint(row_keys) != old["fingerprint"]:
        return None
    held, entries = manifest["teachers"], header["teachers"]
    found = [_find_teacher(held, e, e["languages"]) for e in entries]
    extending = manifest.get("extending")
    if extending is None:
        new: list[int] = []
        for j, k in enumerate(found):
            if k is not None or any(_identity_difference(entries[i], entries[j]) is None for i in new):
                continue  # cached, or asked for twice
            same = _find_teacher(held, entries[j], [])
            lacking = sorted(set(entries[j]["languages"]) - set(known if same is None else held[same]["languages"]))
            if lacking:
                where = "the cache's rows" if same is None else f"its cached column t{same}"
                raise CacheError(
                    f"teachers.{j}.languages: the teacher reads captions in {lacking}, which {where} do not cover "
                    f"({known if same is None else held[same]['languages']}); rebuild the cache with all its "
                    f"teachers (--rebuild)"
                )
            new.append(j)
        if not new:
            return _summary(directory, manifest, 0, 0.0)
        first = len(held)
        pending = [entries[j] for j in new]
    else:  # resume an interrupted addition: its teachers must be among those asked for
        first = extending["from_teacher"]
        pending = held[first:]
        new = [next((j for j, e in enumerate(entries) if _identity_difference(p, e) is None), None) for p in pending]
        if None in new:
            missing = [p["id"] for p, j in zip(pending, new, strict=True) if j is None]
            raise CacheError(
                f"{directory}: adding the teachers {missing} to this cache was interrupted; give them to "
                f"`vldistill cache` to finish it, or replace the cache (--rebuild)"
            )

    def build(progress: bool) -> dict[str, Any]:
        if extending is None:  # start the addition: from here on the cache is not used until it is complete
            manifest["teachers"] = [*held, *pending]
            manifest["extending"] = {"from_teacher": first, "shards_done": 0}
            manifest["complete"] = False
            _write_json(directory / MANIFEST, manifest)
        for stale in directory.glob(".*.tmp"):
            stale.unlink()
        stored = None
        if manifest["augmentation"]["views"] > 1:  # the views the cached teachers saw, not recomputed
            stored = np.concatenate([_read_column(directory / s["file"], "views") for s in manifest["shards"]])
        chosen, langs = [teachers[j] for j in new], [p["languages"] for p in pending]  # as the manifest lists them
        return _run_build(directory, chosen, dataset, langs, row_keys, stored, manifest, options, progress, first)

    return build


def _read_column(path: Path, name: str) -> np.ndarray:
    """One tensor of a shard, without reading the others."""
    with safe_open(str(path), framework="np") as f:
        return f.get_tensor(name)


def _clear(directory: Path) -> None:
    """Delete a cache's own files (and nothing else a user may keep in the directory)."""
    for path in [directory / MANIFEST, *directory.glob("shard-*.safetensors"), *directory.glob(".*.tmp")]:
        path.unlink(missing_ok=True)


def _header(teachers, languages, identities, dataset, digests, digest_langs, options, pad_bytes) -> dict[str, Any]:
    """The part of the manifest that defines the cache's content (what a resumed build must agree with)."""
    if len(identities) != len(teachers) or len(languages) != len(teachers):
        raise ValueError("build_cache needs one identity and one list of languages per teacher")
    entries = []
    for teacher, ident, langs in zip(teachers, identities, languages, strict=True):
        scale = teacher.logit_scale()
        entries.append(
            {
                **ident,
                "languages": list(langs),
                "dims": dataclasses.asdict(teacher.dims),
                "logit_scale": None if scale is None else float(scale.float()),
                "max_length": teacher.max_length,
                "padding": "max_length" if teacher.model_type == "siglip" else "longest",
                "padding_side": getattr(teacher.tokenizer, "padding_side", "right"),
            }
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teachers": entries,
        "dataset": {
            "fingerprint": fingerprint(digests),
            "rows": len(digests),
            "source": str(getattr(dataset, "source", "")),
            "languages": list(digest_langs),
            "hash": "blake2b-128 of each image's bytes and captions; sha256 of the row digests in order",
        },
        "augmentation": augmentation_settings(options),
        "dtype": options.dtype,
        "tokens": options.tokens,
        "pad_bytes": pad_bytes,
    }


def _view_params(digests: np.ndarray, aug: dict[str, Any]) -> np.ndarray | None:
    if aug["views"] == 1:
        return None
    params = [[sample_view(d.tobytes(), v, aug) for v in range(aug["views"])] for d in digests]
    return np.asarray(params, dtype=np.float32)  # float32 first: the build applies exactly what training replays


_TOKENS = frozenset({"teacher", "image_tokens", "text_tokens"})


def _needs(options: CacheConfig) -> frozenset[str]:
    return _TOKENS if options.tokens else frozenset({"teacher"})


def _auto_shard_rows(teachers, dataset, header, collate) -> int:
    """Rows per shard for about :data:`SHARD_BYTES`; with token features, one sample tells their size."""
    itemsize = torch.empty((), dtype=_DTYPES[header["dtype"]]).element_size()
    k = header["augmentation"]["views"]
    per_row = 16 + 20 * k + header["pad_bytes"]
    for i, (teacher, entry) in enumerate(zip(teachers, header["teachers"], strict=True)):
        d, n_langs = entry["dims"]["embed"], len(entry["languages"])
        per_row += (k * d + n_langs * d) * itemsize
        if header["tokens"]:
            out = encode_batch(teacher, collate([dataset[0]])["teachers"][i], _TOKENS)
            per_row += k * out.image_tokens[0].numel() * itemsize
            per_row += n_langs * entry["max_length"] * (entry["dims"]["text_width"] * itemsize + 1)
    return max(1, SHARD_BYTES // per_row)


def _valid_prefix(directory: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The listed shards up to the first one that is missing or has the wrong size."""
    kept = []
    for shard in shards:
        path = directory / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    return kept


def _run_build(
    directory, teachers, dataset, languages, digests, views, manifest, options, progress, column: int | None = None
) -> dict[str, Any]:
    """Compute ``teachers`` over the shards not yet written and write them. With ``column`` (adding teachers to a
    complete cache, ``manifest["extending"]``) their outputs go to columns ``t{column}``, ``t{column + 1}``, ...
    of the existing shards instead."""
    n, per_shard, bs = len(digests), manifest["shard_rows"], options.batch_size
    adding = column is not None
    first = manifest["extending"]["shards_done"] if adding else len(manifest["shards"])
    bounds = [(s, min(s + per_shard, n)) for s in range(first * per_shard, n, per_shard)]
    batches = [list(range(a, min(a + bs, end))) for start, end in bounds for a in range(start, end, bs)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_BuildCollate(teachers, languages, views),
        num_workers=options.workers if batches else 0,
        persistent_workers=False,
        pin_memory=teachers[0].device.type == "cuda",
        generator=torch.Generator(),  # leaves the global RNG (and so a later run's initialisation) alone
    )
    needs, dtype = _needs(options), _DTYPES[manifest["dtype"]]
    bar = tqdm(
        total=n, initial=first * per_shard, unit="sample", desc="cache", disable=not progress, dynamic_ncols=True
    )
    start_time, built = time.perf_counter(), 0
    pending = None
    shard_index, buffers, filled = first, {}, 0
    with ThreadPoolExecutor(1) as writer:  # the next shard is computed while the last one is written
        for batch in loader:
            rows = len(batch["index"])
            for k, (teacher, inputs) in enumerate(zip(teachers, batch["teachers"], strict=True)):
                out = encode_batch(teacher, inputs, needs)
                _collect(buffers, (column or 0) + k, out, manifest["teachers"][(column or 0) + k], rows, dtype)
            filled += rows
            built += rows
            bar.update(rows)
            start, end = bounds[shard_index - first]
            if filled == end - start:
                tensors = {name: torch.cat(parts) for name, parts in buffers.items()}
                tensors["row_key"] = torch.from_numpy(digests[start:end].copy())
                if pending is not None:
                    pending.result()  # at most one shard waits in memory; a failed write stops the build
                if adding:  # new columns into the existing shard (its views and padding are already there)
                    pending = writer.submit(_add_columns, directory, manifest, shard_index, tensors)
                else:
                    if views is not None:
                        tensors["views"] = torch.from_numpy(views[start:end].copy())
                    if manifest["pad_bytes"]:
                        tensors["pad"] = torch.zeros(end - start, manifest["pad_bytes"], dtype=torch.uint8)
                    pending = writer.submit(_write_shard, directory, manifest, shard_index, start, tensors)
                shard_index, buffers, filled = shard_index + 1, {}, 0
        if pending is not None:
            pending.result()
    bar.close()
    manifest.pop("extending", None)
    manifest["complete"] = True
    _write_json(directory / MANIFEST, manifest)
    return _summary(directory, manifest, built, time.perf_counter() - start_time)


def _collect(buffers: dict[str, list[Tensor]], k: int, out: Embeddings, entry, rows: int, dtype) -> None:
    def put(name: str, value: Tensor) -> None:
        buffers.setdefault(f"t{k}.{name}", []).append(value.detach().to("cpu", dtype))

    put("image", out.image.reshape(rows, -1, out.image.shape[-1]))
    if out.image_tokens is not None:
        put("image_tokens", out.image_tokens.reshape(rows, -1, *out.image_tokens.shape[1:]))
    for lang, emb in out.text.items():
        put(f"text.{lang}", emb)
        if lang in out.text_tokens:
            tokens, mask = out.text_tokens[lang], out.text_mask[lang]
            pad = entry["max_length"] - tokens.shape[1]
            left = entry["padding_side"] == "left"
            put(f"text_tokens.{lang}", nn.functional.pad(tokens, (0, 0, pad, 0) if left else (0, 0, 0, pad)))
            mask = nn.functional.pad(mask, (pad, 0) if left else (0, pad))
            buffers.setdefault(f"t{k}.text_mask.{lang}", []).append(mask.to("cpu", torch.uint8))


def _write_shard(directory: Path, manifest: dict[str, Any], index: int, start: int, tensors: dict[str, Tensor]):
    name = f"shard-{index:05d}.safetensors"
    tmp = directory / f".{name}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, directory / name)
    rows = len(tensors["row_key"])
    manifest["shards"].append({"file": name, "start": start, "rows": rows, "bytes": (directory / name).stat().st_size})
    _write_json(directory / MANIFEST, manifest)  # the shard is listed only once it is whole


def _add_columns(directory: Path, manifest: dict[str, Any], index: int, tensors: dict[str, Tensor]) -> None:
    """Rewrite shard ``index`` with ``tensors`` (new teachers' columns) added; listed as done once it is whole."""
    shard = manifest["shards"][index]
    path = directory / shard["file"]
    columns = {**load_file(str(path)), **tensors}
    tmp = directory / f".{shard['file']}.tmp"
    save_file({k: v.contiguous() for k, v in columns.items()}, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    shard["bytes"] = path.stat().st_size
    manifest["extending"]["shards_done"] = index + 1
    _write_json(directory / MANIFEST, manifest)


def _summary(directory: Path, manifest: dict[str, Any], built: int, seconds: float) -> dict[str, Any]:
    return {
        "cache": str(directory),
        "complete": manifest["complete"],
        "rows": manifest["dataset"]["rows"],
        "shards": len(manifest["shards"]),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "teachers": [t["id"] for t in manifest["teachers"]],
        "built_rows": built,
        "seconds": round(seconds, 3),
        "samples_per_second": round(built / seconds, 2) if seconds > 0 else None,
    }


# ---------------------------------------------------------------------------------------------- manifest I/O
def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The cache's manifest, or ``None`` when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a vldistill teacher cache (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"format_version: the cache at {directory} has format {manifest.get('format_version')}, this vldistill "
            f"reads {FORMAT_VERSION}; rebuild it"
        )
    return manifest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The dotted path of the first field where two manifests differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
            if diff is not None:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            diff = _first_difference(a, b, f"{prefix}.{i}")
            if diff is not None:
                return diff
        return None
    return None if old == new else (prefix, old, new)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------- reading
class _Shard:
    """One shard, memory-mapped read-only: each tensor is a numpy view of the mapping (nothing is loaded)."""

    def __init__(self, path: Path, size: int):
        if not path.is_file() or path.stat().st_size != size:
            raise CacheError(f"shard {path} is missing or has the wrong size: the cache is damaged; rebuild it")
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self.map[:8])
        header = json.loads(self.map[8 : 8 + n])
        buffer = np.frombuffer(self.map, dtype=np.uint8)
        self.arrays: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            raw = buffer[8 + n + begin : 8 + n + end]
            self.arrays[name] = raw.view(_NUMPY[info["dtype"]]).reshape(info["shape"])
            self.dtypes[name] = _TORCH[info["dtype"]]

    def release(self) -> None:
        """Drop the mapped pages from this process (the kernel's page cache keeps them for the next read)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)


class CachedTeachers:
    """A ``TeacherSource`` that reads the teachers' outputs from a complete cache instead of running them.

    Opening checks the cache against the run and maps every training row to its cached row; a cache that is
    incomplete, was built from another teacher, processor, dataset or augmentation setting, or lacks rows for some
    samples is refused with a :class:`CacheError` that names the field (or the number of missing rows).

    Args:
        directory: the cache directory.
        dataset: the training data the run reads (its ``index`` values are looked up).
        teachers: per teacher, the run's :func:`teacher_identity`.
        languages: per teacher, the caption languages the run needs its text embeddings in.
        options: the run's cache settings (dtype and augmentation must match the cache's).

    Attributes:
        dims: each teacher's widths (so a run needs no loaded teacher).
        views: the stored views of each training row, or ``None`` without augmentation.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        dataset,
        teachers: Sequence[dict[str, Any]],
        languages: Sequence[Sequence[str]],
        options: CacheConfig | None = None,
    ):
        options = options or CacheConfig()
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise CacheError(f"no teacher cache at {self.directory} (no {MANIFEST}): build it with `vldistill cache`")
        if "extending" in manifest:
            adding = [t["id"] for t in manifest["teachers"][manifest["extending"]["from_teacher"] :]]
            raise CacheError(
                f"the teacher cache at {self.directory} is incomplete: adding the teachers {adding} to it was "
                f"interrupted; run `vldistill cache` with them again to finish. An incomplete cache is never used."
            )
        if not manifest["complete"]:
            raise CacheError(
                f"the teacher cache at {self.directory} is incomplete ({len(manifest['shards'])} shards of "
                f"{math.ceil(manifest['dataset']['rows'] / manifest['shard_rows'])} written: its build was "
                f"interrupted); run `vldistill cache` again to resume it. An incomplete cache is never used."
            )
        self.manifest = manifest
        self._columns = _match_teachers(manifest["teachers"], list(teachers), [list(x) for x in languages])
        diff = _first_difference(manifest["augmentation"], augmentation_settings(options))
        if diff is not None:
            field, old, new = diff
            raise CacheError(
                f"augmentation.{field} (recipe: cache.{field}): the cache was built with {_short(old)}, the run "
                f"asks for {_short(new)}"
            )
        if manifest["dtype"] != options.dtype:
            raise CacheError(
                f"dtype (recipe: cache.dtype): the cache stores {manifest['dtype']}, the run asks for {options.dtype}"
            )
        self.languages = [list(x) for x in languages]
        self._read = 0
        entries = [manifest["teachers"][k] for k in self._columns]
        self.dims = tuple(ModelDims(**t["dims"]) for t in entries)
        self._out_dtypes = [_DTYPES.get(t["dtype"], torch.float32) for t in entries]
        self._shards = [_Shard(self.directory / s["file"], s["bytes"]) for s in manifest["shards"]]
        self._shard, self._offset = self._locate(dataset)
        self.views = self._view_table() if manifest["augmentation"]["views"] > 1 else None

    # ------------------------------------------------------------------------------------------ opening
    def _locate(self, dataset) -> tuple[np.ndarray, np.ndarray]:
        """Shard and offset of every dataset row, found by content digest."""
        info = self.manifest["dataset"]
        digests = dataset_digests(dataset, info["languages"])
        n = len(digests)
        if fingerprint(digests) == info["fingerprint"]:  # the very data it was built on: row i is cached row i
            rows = np.arange(n)
            return rows // self.manifest["shard_rows"], rows % self.manifest["shard_rows"]
        where: dict[bytes, tuple[int, int]] = {}
        for s, shard in enumerate(self._shards):
            for offset, key in enumerate(shard.arrays["row_key"]):
                where.setdefault(key.tobytes(), (s, offset))
        found = [where.get(d.tobytes()) for d in digests]
        missing = sum(loc is None for loc in found)
        built_on = f"{info['rows']} rows of {info['source'] or 'a dataset'!r}, fingerprint {info['fingerprint'][:12]}"
        if missing == n:
            raise CacheError(
                f"dataset: the cache was built on another dataset ({built_on}): none of the {n} training samples "
                f"(fingerprint {fingerprint(digests)[:12]}) is in it"
            )
        if missing:
            raise CacheError(
                f"dataset: the cache lacks rows for {missing} of the {n} training samples (it was built on "
                f"{built_on}); rebuild it for this data"
            )
        return np.array([loc[0] for loc in found]), np.array([loc[1] for loc in found])

    def _view_table(self) -> ViewTable:
        return ViewTable(self._gather("views", np.arange(len(self._shard)), None))

    def check_needs(self, needs: frozenset[str], where: str = "") -> None:
        """Fail before training when a loss needs token features the cache does not have."""
        wanted = sorted(needs & {"image_tokens", "text_tokens"})
        if wanted and not self.manifest["tokens"]:
            raise CacheError(
                f"{where + ': ' if where else ''}a loss needs {wanted}, but the teacher cache at {self.directory} "
                f"has no token features; rebuild it with cache.tokens: true"
            )

    # ------------------------------------------------------------------------------------------ reading
    def __call__(self, batch: dict[str, Any], needs: frozenset[str]) -> list[Embeddings]:
        self.check_needs(needs)
        index = batch["index"]
        rows = index.cpu().numpy()
        views = batch.get("views")
        views = views.cpu().numpy() if views is not None else np.zeros(len(rows), dtype=np.int64)
        device = index.device
        outs = []
        for j, (k, langs) in enumerate(zip(self._columns, self.languages, strict=True)):
            entry, dtype = self.manifest["teachers"][k], self._out_dtypes[j]
            scale = entry["logit_scale"]
            out = Embeddings(logit_scale=None if scale is None else torch.tensor(scale, dtype=dtype, device=device))
            out.image = self._get(f"t{k}.image", rows, views, device, dtype)
            if "image_tokens" in needs:
                out.image_tokens = self._get(f"t{k}.image_tokens", rows, views, device, dtype)
            for lang in langs:
                out.text[lang] = self._get(f"t{k}.text.{lang}", rows, None, device, dtype)
                if "text_tokens" in needs:
                    tokens = self._get(f"t{k}.text_tokens.{lang}", rows, None, device, dtype)
                    mask = self._get(f"t{k}.text_mask.{lang}", rows, None, device, torch.long)
                    if entry["padding"] == "longest":  # as the live tokenizer pads: to the batch's longest caption
                        length = int(mask.sum(1).max())
                        cut = slice(-length, None) if entry["padding_side"] == "left" else slice(0, length)
                        tokens, mask = tokens[:, cut], mask[:, cut]
                    out.text_tokens[lang], out.text_mask[lang] = tokens, mask
            outs.append(out)
        return outs

    def _get(self, name: str, rows: np.ndarray, views: np.ndarray | None, device, dtype) -> Tensor:
        return self._gather(name, rows, views).to(device=device, dtype=dtype)

    def _gather(self, name: str, rows: np.ndarray, views: np.ndarray | None) -> Tensor:
        """Rows (and views) of one tensor, gathered shard by shard from the memory maps."""
        if name not in self._shards[0].arrays:
            raise CacheError(f"the teacher cache at {self.directory} has no {name!r}")
        shard, offset = self._shard[rows], self._offset[rows]
        first = self._shards[0].arrays[name]
        out = np.empty((len(rows), *first.shape[1 + (views is not None) :]), dtype=first.dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            array = self._shards[s].arrays[name]
            out[sel] = array[offset[sel], views[sel]] if views is not None else array[offset[sel]]
        self._read += len(rows) * max(out.nbytes // max(len(rows), 1), mmap.PAGESIZE)  # a row maps a page at least
        if self._read >= RELEASE_BYTES:  # keep the resident set bounded on caches larger than memory
            for s in self._shards:
                s.release()
            self._read = 0
        return torch.from_numpy(out).view(self._shards[0].dtypes[name])


def _identity_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first identity field in which a cached teacher and a run's teacher differ, or ``None``: the same teacher."""
    hashes = [h for h in ("weights", "files") if old.get(h) and new.get(h)]
    fields = hashes[:1] if hashes else ["id", "revision"]  # the content decides when it can be compared
    return next((f for f in [*fields, "processor", "dtype"] if old.get(f) != new.get(f)), None)


def _find_teacher(cached: list[dict[str, Any]], wanted: dict[str, Any], languages: Sequence[str]) -> int | None:
    """The column of the cached teacher that is ``wanted`` and has text embeddings in ``languages``, if any."""
    return next(
        (
            k
            for k, old in enumerate(cached)
            if _identity_difference(old, wanted) is None and set(languages) <= set(old["languages"])
        ),
        None,
    )


def _match_teachers(cached: list[dict[str, Any]], run: list[dict[str, Any]], languages: list[list[str]]) -> list[int]:
    """For each of the run's teachers, the cache column that holds its outputs: a cache of several teachers serves
    any of them, in any order. A teacher the cache lacks is refused, naming what differs from the cached teacher in
    its position (or the first)."""
    columns = []
    for j, (new, langs) in enumerate(zip(run, languages, strict=True)):
        k = _find_teacher(cached, new, langs)
        if k is not None:
            columns.append(k)
            continue
        key, same = f"teachers.{j}", _find_teacher(cached, new, [])
        if same is not None:  # cached, but without some of the languages the run needs
            lacking = [lang for lang in langs if lang not in cached[same]["languages"]]
            raise CacheError(
                f"{key}.languages: the run needs text embeddings in {lacking}, the cache has "
                f"{cached[same]['languages']} for this teacher; rebuild it with them (--rebuild)"
            )
        old = cached[min(j, len(cached) - 1)]
        field = _identity_difference(old, new)
        raise CacheError(
            f"{key}.{field}: the cache was built by another teacher ({field} {_short(old.get(field))}, id "
            f"{old['id']!r}) than the run's ({_short(new.get(field))}, id {new['id']!r}); the cache holds "
            f"{[t['id'] for t in cached]}; `vldistill cache` adds a teacher to it"
        )
    return columns


# ------------------------------------------------------------------------------------------------- recipes
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


def recipe_languages(cfg: RecipeConfig, teachers: Sequence[Teacher] | None = None) -> list[list[str]]:
    """Per teacher, the recipe's caption languages that teacher understands (what the live trainer gives it)."""
    langs = [getattr(t, "languages", None) for t in teachers] if teachers else [t.languages for t in cfg.teachers]
    return [[lang for lang in cfg.data.languages if lang in (mine or ["en"])] for mine in langs]


def recipe_identities(cfg: RecipeConfig, teachers: Sequence[Teacher] | None = None) -> list[dict[str, Any]]:
    """Each teacher's identity: from the loaded teachers when given, else from the recipe (no model loaded)."""
    if teachers:
        return [teacher_identity(t, tc.name_or_path, tc.revision) for t, tc in zip(teachers, cfg.teachers, strict=True)]
    return [teacher_identity(None, tc.name_or_path, tc.revision, tc.dtype, tc.trust_remote_code) for tc in cfg.teachers]


def recipe_needs_tokens(cfg: RecipeConfig, dims: Sequence[ModelDims]) -> bool:
    """Whether any loss of the recipe reads token features."""
    stand_in = Dims(student=dims[0], teachers=tuple(dims))  # a loss's needs do not depend on the student's widths
    with torch.random.fork_rng(devices=[]):
        needs = frozenset().union(*(build_stage_loss(s, stand_in, i).needs for i, s in enumerate(cfg.stages)))
    return bool(needs & {"image_tokens", "text_tokens"})


def build_recipe_cache(
    cfg: RecipeConfig,
    teachers: Sequence[Teacher],
    dataset,
    directory: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool | None = None,
    pad_bytes: int = 0,
) -> dict[str, Any]:
    """Build (or resume, or reuse) the cache of a recipe's teachers on its training data."""
    if len(teachers) != len(cfg.teachers):
        raise ConfigError(f"teachers: the recipe has {len(cfg.teachers)}, {len(teachers)} were given")
    options = cfg.cache
    if not options.tokens and recipe_needs_tokens(cfg, [t.dims for t in teachers]):
        options = dataclasses.replace(options, tokens=True)
    return build_cache(
        recipe_cache_dir(cfg, directory),
        teachers,
        dataset,
        recipe_languages(cfg, teachers),
        recipe_identities(cfg, teachers),
        options,
        rebuild=rebuild,
        progress=cfg.train.progress if progress is None else progress,
        pad_bytes=pad_bytes,
    )


def open_recipe_cache(cfg: RecipeConfig, dataset, teachers: Sequence[Teacher] | None = None) -> CachedTeachers:
    """The :class:`CachedTeachers` of a recipe whose teachers say ``source: cache``, checked against the recipe
    (and against ``teachers`` when they are loaded: their weights are then compared too)."""
    return CachedTeachers(
        recipe_cache_dir(cfg),
        dataset,
        recipe_identities(cfg, teachers),
        recipe_languages(cfg, teachers),
        cfg.cache,
    )


__all__ = [
    "CacheError",
    "CachedTeachers",
    "ViewTable",
    "apply_view",
    "build_cache",
    "build_recipe_cache",
    "dataset_digests",
    "open_recipe_cache",
    "processor_digest",
    "read_manifest",
    "sample_view",
    "teacher_identity",
    "weights_digest",
]
