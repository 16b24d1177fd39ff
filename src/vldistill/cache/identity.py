"""What a cache was built from, and how a run is compared with it: teacher identity, the manifest, :class:`CacheError`.

The manifest records, per teacher: its id (hub id or resolved directory) and revision, a SHA-256 of its weights
(state dict) and, when it was loaded from a directory or the local hub cache, of its weight files and
``config.json``; a hash of its processor (the tokenizer's full ``tokenizer.json`` and padding side, the image
processor's ``to_dict()``); its dtype and the text fields it embeds. Two teachers are the same when their weights
agree by whichever hash both sides have (the id and revision only when neither hash can be computed) and their
processor and dtype agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import write_text
from ..models import DualEncoder

FORMAT = "vldistill-teacher-cache"
FORMAT_VERSION = 2
"""2: one text column per text field (captions per language, ``question``, ``qa``, ``candidates``, ...), and the
row digests hash those fields' texts; 1 (vldistill before task samples): caption languages only."""
MANIFEST = "manifest.json"


class CacheError(ValueError):
    """A teacher cache that is missing, incomplete, or does not match the run. The message names the field."""


# ------------------------------------------------------------------------------------------------- teachers
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


def identity_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first identity field in which a cached teacher and a run's teacher differ, or ``None``: the same teacher."""
    hashes = [h for h in ("weights", "files") if old.get(h) and new.get(h)]
    fields = hashes[:1] if hashes else ["id", "revision"]  # the content decides when it can be compared
    return next((f for f in [*fields, "processor", "dtype"] if old.get(f) != new.get(f)), None)


def find_teacher(cached: list[dict[str, Any]], wanted: dict[str, Any], fields: Sequence[str]) -> int | None:
    """The column of the cached teacher that is ``wanted`` and has text embeddings of ``fields``, if any."""
    return next(
        (
            k
            for k, old in enumerate(cached)
            if identity_difference(old, wanted) is None and set(fields) <= set(old["fields"])
        ),
        None,
    )


# ------------------------------------------------------------------------------------------------- manifest
def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The cache's manifest, or ``None`` when there is none.

    Raises:
        CacheError: the file is not a vldistill cache manifest, or one of another format version.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a vldistill teacher cache (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        which = "another" if not isinstance(version, int) else "an older" if version < FORMAT_VERSION else "a newer"
        raise CacheError(
            f"format_version: the cache at {directory} was written by {which} vldistill "
            f"(cache format {version}; this vldistill reads format {FORMAT_VERSION}); rebuild it: "
            f"`vldistill cache ... --rebuild`"
        )
    return manifest


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, then rename): a reader never sees half a manifest."""
    write_text(path, json.dumps(data, indent=1))  # atomic; a full disk names the file


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The dotted path of the first field where two manifests differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            diff = first_difference(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
            if diff is not None:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            diff = first_difference(a, b, f"{prefix}.{i}")
            if diff is not None:
                return diff
        return None
    return None if old == new else (prefix, old, new)


def short(value: Any) -> str:
    """A manifest value for an error message, cut to 80 characters."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
