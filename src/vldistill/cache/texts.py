"""Teacher embeddings of a run's free texts (``data.texts``), computed once before the student trains.

Free texts have no image and no row in the training data, so they are not columns of the shards: each teacher
embeds all of them into one table (:class:`FreeTextTable`), which the training step reads by row. With a teacher
cache, the tables are stored beside the shards as ``texts-KEY.safetensors`` (written atomically), where ``KEY``
hashes the cached teachers' identities (as the manifest records them), the languages each embeds and the texts
themselves: a run from the cache then needs no teacher, and changed texts or another teacher get another file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from ..data.texts import FreeTexts, free_field
from ..files import write_bytes
from ..models import Teacher, tokenize_texts
from .identity import CacheError

__all__ = ["FreeTextTable", "free_text_file", "free_text_table", "load_free_text_tables", "save_free_text_tables"]


@dataclass
class FreeTextTable:
    """One teacher's pooled embeddings of every free text: ``embeddings`` ``[M, d]``, valid for the rows whose
    field is in ``fields`` (the languages the teacher embeds; other rows are zeros and never read)."""

    embeddings: Tensor
    fields: frozenset[str]

    def rows(self, index: Tensor) -> Tensor:
        """The embeddings of free-text rows ``index``, on ``index``'s device."""
        if self.embeddings.device != index.device:  # moved once, at the first step on that device
            self.embeddings = self.embeddings.to(index.device)
        return self.embeddings[index]


@torch.no_grad()
def free_text_table(
    teacher: Teacher, texts: FreeTexts, languages: Sequence[str], batch_size: int = 256, name: str = "the teacher"
) -> FreeTextTable:
    """Embed the free texts of ``languages`` (the teacher's) with ``teacher``; a non-finite output is an error that
    names the text."""
    fields = frozenset(free_field(lang) for lang in languages)
    rows = [i for i, f in enumerate(texts.fields) if f in fields]
    device = next(teacher.parameters()).device
    out = torch.zeros(len(texts), teacher.dims.embed)
    was_training = teacher.training
    teacher.eval()
    try:
        for a in range(0, len(rows), batch_size):
            chunk = rows[a : a + batch_size]
            enc = tokenize_texts(
                teacher.tokenizer, teacher.model_type, teacher.max_length, [texts.texts[i] for i in chunk]
            )
            emb = teacher.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()
            bad = ~torch.isfinite(emb).all(dim=1)
            if bad.any():
                i = chunk[int(bad.nonzero()[0])]
                raise CacheError(f"{name} gave a non-finite embedding for free text {i} ({texts.texts[i][:80]!r})")
            out[chunk] = emb
    finally:
        teacher.train(was_training)
    return FreeTextTable(out, fields)


def free_text_file(directory: str | os.PathLike, teachers: Sequence[dict[str, Any]], languages, texts: FreeTexts):
    """Where a cache keeps the tables of these teachers (their manifest entries), languages and texts."""
    key = json.dumps(
        {"teachers": list(teachers), "languages": [list(langs) for langs in languages], "texts": texts.fingerprint()},
        sort_keys=True,
        default=str,
    )
    return Path(directory) / f"texts-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def save_free_text_tables(path: Path, tables: Sequence[FreeTextTable]) -> None:
    """Write the tables atomically (``t{j}``: teacher ``j``'s embeddings; its fields in the metadata)."""
    tensors = {f"t{j}": t.embeddings.contiguous() for j, t in enumerate(tables)}
    metadata = {f"t{j}": json.dumps(sorted(t.fields)) for j, t in enumerate(tables)}
    write_bytes(path, save(tensors, metadata=metadata))


def load_free_text_tables(path: Path, teachers: int, rows: int) -> list[FreeTextTable] | None:
    """The tables stored at ``path``, or ``None`` when there is no such file; a damaged one is an error."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        tables = [FreeTextTable(tensors[f"t{j}"], frozenset(json.loads(metadata[f"t{j}"]))) for j in range(teachers)]
    except Exception as err:
        raise CacheError(f"{path} is damaged ({err}); delete it and it is computed again") from None
    if any(t.embeddings.shape[0] != rows for t in tables):
        raise CacheError(f"{path} holds {tables[0].embeddings.shape[0]} free texts, not {rows}; delete it")
    return tables
