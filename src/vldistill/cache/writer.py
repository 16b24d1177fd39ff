"""Running teachers over the rows of a cache and writing their outputs, shard by shard.

A shard is one safetensors file written once (temporary name, then ``os.replace``) and listed in the manifest only
when it is whole, with its size and SHA-256 (computed from the bytes written, never read back), so a killed build
leaves whole shards and a manifest listing them, and a shard damaged later is found (:func:`damaged_shards`). Adding a
teacher rewrites each shard with its columns appended, the same way; recomputing damaged shards rewrites just those.
A teacher output that is not finite (NaN or inf) stops the build, naming the teacher and the rows.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..batching import teacher_texts
from ..config import CacheConfig
from ..files import file_sha256, save_safetensors
from ..models import DualEncoder, DualEncoderProcessor, encode_batch
from ..outputs import Embeddings
from .identity import FORMAT, MANIFEST, CacheError, write_json
from .views import apply_view

SHARD_BYTES = 256 << 20
"""Target size of one shard when ``cache.shard_rows`` is not set."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TOKENS = frozenset({"teacher", "image_tokens", "text_tokens"})


class _BuildCollate:
    """Raw samples -> each teacher's inputs (the trainer's own preprocessing), each image in its K views, each
    teacher's text fields as :func:`~vldistill.batching.teacher_texts` gives them (so as the trainer's collator)."""

    def __init__(self, teachers: Sequence[DualEncoder], fields: Sequence[Sequence[str]], views: np.ndarray | None):
        self.processors = [DualEncoderProcessor(t) for t in teachers]
        self.fields = [list(names) for names in fields]
        self.views = views

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        if self.views is not None:
            images = [
                apply_view(img, p) for img, s in zip(images, samples, strict=True) for p in self.views[s["index"]]
            ]
        per_sample = [teacher_texts(s) for s in samples]
        wanted = sorted({name for names in self.fields for name in names})
        texts = {name: [t[name] for t in per_sample] for name in wanted}
        return {
            "index": torch.tensor([s["index"] for s in samples]),
            "teachers": [proc(images, texts, names) for proc, names in zip(self.processors, self.fields, strict=True)],
        }


def needs(options: CacheConfig) -> frozenset[str]:
    """What the teachers are asked for: pooled outputs, and token features with ``cache.tokens``."""
    return _TOKENS if options.tokens else frozenset({"teacher"})


def auto_shard_rows(teachers, dataset, header, fields, views) -> int:
    """Rows per shard for about :data:`SHARD_BYTES`; with token features, one sample tells their size."""
    collate = _BuildCollate(teachers, fields, views)
    itemsize = torch.empty((), dtype=DTYPES[header["dtype"]]).element_size()
    k = header["augmentation"]["views"]
    first = dataset[0]
    texts = teacher_texts(first)
    per_row = 16 + 20 * k + header["pad_bytes"]
    for i, (teacher, entry) in enumerate(zip(teachers, header["teachers"], strict=True)):
        d = entry["dims"]["embed"]
        counts = [1 if isinstance(texts[f], str) else len(texts[f]) for f in entry["fields"]]
        per_row += (k * d + sum(counts) * d) * itemsize
        if header["tokens"]:
            out = encode_batch(teacher, collate([first])["teachers"][i], _TOKENS)
            per_row += k * out.image_tokens[0].numel() * itemsize
            n_token_fields = sum(isinstance(texts[f], str) for f in entry["fields"])  # none for candidate fields
            per_row += n_token_fields * entry["max_length"] * (entry["dims"]["text_width"] * itemsize + 1)
    return max(1, SHARD_BYTES // per_row)


def run_build(
    directory,
    teachers,
    dataset,
    fields,
    digests,
    views,
    manifest,
    options,
    progress,
    column: int | None = None,
    shards: Sequence[int] | None = None,
    record: bool = False,
) -> dict[str, Any]:
    """Compute ``teachers`` over the shards not yet written and write them. With ``column`` (adding teachers to a
    complete cache, ``manifest["extending"]``) their outputs go to columns ``t{column}``, ``t{column + 1}``, ...
    of the existing shards instead, each rewritten shard recorded beside it (:class:`.extend.Addition` passes
    ``shards`` and ``record``). With ``shards``, those shards (damaged ones) are computed again and replaced.
    With ``record`` (one process of several, :mod:`.distributed`), each shard written is recorded beside it in
    ``shard-NNNNN.json`` and the manifest is left alone: process 0 writes it once every shard is whole."""
    n, per_shard, bs = len(digests), manifest["shard_rows"], options.batch_size
    adding = column is not None
    first = manifest["extending"]["shards_done"] if adding else len(manifest["shards"])
    indices = list(shards) if shards is not None else list(range(first, -(-n // per_shard)))
    bounds = [(i * per_shard, min((i + 1) * per_shard, n)) for i in indices]
    batches = [list(range(a, min(a + bs, end))) for start, end in bounds for a in range(start, end, bs)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_BuildCollate(teachers, fields, views),
        num_workers=options.workers if batches else 0,
        persistent_workers=False,
        pin_memory=teachers[0].device.type == "cuda",
        generator=torch.Generator(),  # leaves the global RNG (and so a later run's initialisation) alone
    )
    asked, dtype = needs(options), DTYPES[manifest["dtype"]]
    todo = sum(end - start for start, end in bounds)
    bar = tqdm(total=n, initial=n - todo, unit="sample", desc="cache", disable=not progress, dynamic_ncols=True)
    start_time, built = time.perf_counter(), 0
    pending = None
    position, buffers, filled = 0, {}, 0
    with ThreadPoolExecutor(1) as writer:  # the next shard is computed while the last one is written
        for batch in loader:
            rows = len(batch["index"])
            for k, (teacher, inputs) in enumerate(zip(teachers, batch["teachers"], strict=True)):
                out = encode_batch(teacher, inputs, asked)
                entry = manifest["teachers"][(column or 0) + k]
                _check_finite(out, entry, batch["index"])
                _collect(buffers, (column or 0) + k, out, entry, rows, dtype)
            filled += rows
            built += rows
            bar.update(rows)
            shard_index = indices[position]
            start, end = bounds[position]
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
                    pending = writer.submit(_write_shard, directory, manifest, shard_index, start, tensors, record)
                position, buffers, filled = position + 1, {}, 0
        if pending is not None:
            pending.result()
    bar.close()
    if record:
        return {"built_rows": built, "seconds": time.perf_counter() - start_time}
    manifest.pop("extending", None)
    manifest["complete"] = True
    write_json(directory / MANIFEST, manifest)
    return summary(directory, manifest, built, time.perf_counter() - start_time)


def _collect(buffers: dict[str, list[Tensor]], k: int, out: Embeddings, entry, rows: int, dtype) -> None:
    """Append one batch of teacher ``k``'s outputs to the shard's columns (token features padded to max length)."""

    def put(name: str, value: Tensor) -> None:
        buffers.setdefault(f"t{k}.{name}", []).append(value.detach().to("cpu", dtype))

    put("image", out.image.reshape(rows, -1, out.image.shape[-1]))
    if out.image_tokens is not None:
        put("image_tokens", out.image_tokens.reshape(rows, -1, *out.image_tokens.shape[1:]))
    for name, emb in out.text.items():
        put(f"text.{name}", emb)  # [rows, d], or [rows, C, d] for a candidate field
        if name in out.text_tokens:  # not for candidate fields: encode_batch keeps none
            tokens, mask = out.text_tokens[name], out.text_mask[name]
            pad = entry["max_length"] - tokens.shape[1]
            left = entry["padding_side"] == "left"
            put(f"text_tokens.{name}", nn.functional.pad(tokens, (0, 0, pad, 0) if left else (0, 0, 0, pad)))
            mask = nn.functional.pad(mask, (pad, 0) if left else (0, pad))
            buffers.setdefault(f"t{k}.text_mask.{name}", []).append(mask.to("cpu", torch.uint8))


def _check_finite(out: Embeddings, entry: dict[str, Any], index: Tensor) -> None:
    """A teacher output with a NaN or an infinity is never cached: it would train every student on NaN."""
    named = [("image", out.image), ("image_tokens", out.image_tokens)]
    named += [(f"text.{k}", v) for k, v in out.text.items()]
    named += [(f"text_tokens.{k}", v) for k, v in out.text_tokens.items()]
    for name, value in named:
        if value is None:
            continue
        finite = torch.isfinite(value.detach()).reshape(value.shape[0], -1).all(dim=1).cpu()
        if not bool(finite.all()):
            rows = index[~finite[: len(index)]] if len(finite) == len(index) else index
            raise CacheError(
                f"teacher {entry['id']!r} gave non-finite values (NaN or inf) in its {name} output for rows "
                f"{rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}: its weights are damaged; nothing was cached "
                f"for these rows"
            )


def _write_shard(
    directory: Path, manifest: dict[str, Any], index: int, start: int, tensors: dict[str, Tensor], record: bool = False
):
    name = f"shard-{index:05d}.safetensors"
    tmp = directory / f".{name}.tmp"
    digest = save_safetensors(tensors, directory / name, metadata={"format": FORMAT}, tmp=tmp)
    rows = len(tensors["row_key"])
    st = (directory / name).stat()
    entry = {
        "file": name,
        "start": start,
        "rows": rows,
        "bytes": st.st_size,
        "sha256": digest,
        "mtime_ns": st.st_mtime_ns,
    }
    if record:  # one process of several: recorded beside the shard, listed in the manifest at the end
        from .distributed import write_record

        write_record(directory, index, entry, manifest["dataset"]["fingerprint"])
        return
    if index < len(manifest["shards"]):  # a damaged shard, recomputed
        manifest["shards"][index] = entry
    else:
        manifest["shards"].append(entry)
    write_json(directory / MANIFEST, manifest)  # the shard is listed only once it is whole


def _add_columns(directory: Path, manifest: dict[str, Any], index: int, tensors: dict[str, Tensor]) -> None:
    """Rewrite shard ``index`` with ``tensors`` (new teachers' columns) added, and record it beside the shard, naming
    the addition (its first new column), once it is whole; :func:`.distributed.finish_addition` lists the records in
    the manifest when every shard has one (:class:`.extend.Addition`)."""
    from .distributed import write_record

    shard = manifest["shards"][index]
    path = directory / shard["file"]
    columns = {**load_file(str(path)), **tensors}  # a shard rewritten before a kill: its new columns replaced
    tmp = directory / f".{shard['file']}.tmp"
    digest = save_safetensors(columns, path, metadata={"format": FORMAT}, tmp=tmp)
    st = path.stat()
    entry = {"file": shard["file"], "start": shard["start"], "rows": shard["rows"], "bytes": st.st_size}
    entry.update(sha256=digest, mtime_ns=st.st_mtime_ns, adding=manifest["extending"]["from_teacher"])
    write_record(directory, index, entry, manifest["dataset"]["fingerprint"])


def damaged_shards(directory: Path, shards: Sequence[dict[str, Any]], quick: bool = False) -> list[tuple[int, str]]:
    """``(index, what is wrong)`` for each listed shard that is missing, has another size, or whose SHA-256 differs
    from the manifest's (hashed on a few threads: hashlib releases the GIL). Shards listed without a checksum
    (caches written before vldistill stored them) are checked by size only. With ``quick`` (opening a cache to train
    from it), a shard whose size and modification time are the ones the manifest recorded when it was written is
    trusted without being read, as ``make`` and ``rsync`` trust a file; the others (a copied cache, a rewritten
    shard) are hashed. So opening costs a ``stat`` per shard, not a read of the cache."""

    def check(shard: dict[str, Any]) -> str | None:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            return f"{shard['file']}: missing"
        st = path.stat()
        if st.st_size != shard["bytes"]:
            return f"{shard['file']}: {st.st_size} bytes, the manifest says {shard['bytes']}"
        if quick and shard.get("mtime_ns") == st.st_mtime_ns:
            return None
        if shard.get("sha256") and file_sha256(path) != shard["sha256"]:
            return f"{shard['file']}: its SHA-256 differs from the manifest's (its bytes changed)"
        return None

    if not shards:
        return []
    with ThreadPoolExecutor(min(4, len(shards), os.cpu_count() or 1)) as pool:
        found = list(pool.map(check, shards))
    return [(i, why) for i, why in enumerate(found) if why is not None]


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """A shard's safetensors header, without reading its tensors: ``(header length, header)``; the tensors' bytes
    start at ``8 + header length``. Raises ``OSError`` or ``ValueError`` for a file that is not one."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def read_column(path: Path, name: str) -> np.ndarray:
    """One tensor of a shard, without reading the others."""
    with safe_open(str(path), framework="np") as f:
        return f.get_tensor(name)


def summary(directory: Path, manifest: dict[str, Any], built: int, seconds: float) -> dict[str, Any]:
    """What a build returns: directory, rows, shards, bytes, teachers, rows built by this call and its speed."""
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
