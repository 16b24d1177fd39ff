"""Texts without images ("free texts"): what a run may distil a student's text tower on besides its captions.

A real user of a small captioned set usually has far more text than captions: questions, alt texts, product
descriptions, sentences of the target language. A teacher embeds each of them once, before the student trains
(:func:`vldistill.cache.texts.free_text_table`), and stages with ``texts: N`` draw ``N`` of each language into every
micro-batch as the text field ``texts.LANG``, which ``fd`` on the text tower reads (``lang: texts.en``).

Sources (``data.texts``, per language): a ``.txt`` file (one text per line), a ``.jsonl`` file (one object with a
``text`` string per line), or ``bundled:easyvqa-questions`` (the distinct English questions of easy-vqa's train
split: text about the bundled images that names colours and shapes in other words than the captions do). Texts are
stripped and deduplicated per language, in order of first appearance; an empty text is an error naming its file
and line.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .pairs import DataError

__all__ = ["BUNDLED_TEXTS", "FreeTexts", "free_field", "free_fields_of", "load_free_texts"]

FIELD_PREFIX = "texts."


def free_field(lang: str) -> str:
    """The text field a language's free texts form in a batch: ``texts.en``."""
    return FIELD_PREFIX + lang


def free_fields_of(value: object) -> list[str]:
    """The free-text fields (``texts.LANG``) a loss option names (a string or a list of strings)."""
    values = value if isinstance(value, list | tuple) else [value]
    return [v for v in values if isinstance(v, str) and v.startswith(FIELD_PREFIX)]


def _easyvqa_questions() -> list[str]:
    import easy_vqa

    return sorted(set(easy_vqa.get_train_questions()[0]))


BUNDLED_TEXTS = {"bundled:easyvqa-questions": ("en", _easyvqa_questions)}
"""Bundled free-text sources: name -> (language, loader)."""


@dataclass(frozen=True)
class FreeTexts:
    """Free texts of every language, one row each.

    Attributes:
        texts: the texts.
        fields: per row, its field (``texts.LANG``).
        sources: per language, the sources they were read from.
    """

    texts: list[str]
    fields: list[str]
    sources: dict[str, list[str]]

    def __post_init__(self):
        if len(self.texts) != len(self.fields):
            raise ValueError(f"{len(self.texts)} free texts but {len(self.fields)} fields")
        order = list(dict.fromkeys(self.fields))
        if self.fields != [f for f in order for _ in range(self.fields.count(f))]:
            raise ValueError("free texts: the rows of each field must be consecutive (one language after another)")

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """SHA-256 of every (field, text) row, in order: equal exactly when the rows are."""
        digest = hashlib.sha256()
        for field, text in zip(self.fields, self.texts, strict=True):
            digest.update(json.dumps([field, text], ensure_ascii=False).encode())
        return digest.hexdigest()

    def counts(self) -> dict[str, int]:
        """Rows per field."""
        return dict(Counter(self.fields))

    def item(self, row: int) -> dict[str, object]:
        """Row ``row`` as a batch item: the collator routes it to the field ``free_field``."""
        return {"free_index": row, "free_field": self.fields[row], "free_text": self.texts[row]}


def _read_source(source: str, lang: str) -> list[str]:
    if source in BUNDLED_TEXTS:
        bundled_lang, loader = BUNDLED_TEXTS[source]
        if bundled_lang != lang:
            raise DataError(f"data.texts.{lang}: {source} holds {bundled_lang!r} texts, not {lang!r}")
        return loader()
    if source.startswith("bundled:"):
        raise DataError(f"data.texts.{lang}: unknown bundled texts {source!r}; known: {sorted(BUNDLED_TEXTS)}")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise DataError(
            f"data.texts.{lang}: {source}: expected a .txt file (one text per line), a .jsonl file (a 'text' per "
            f"line) or one of {sorted(BUNDLED_TEXTS)}"
        )
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the text
    except FileNotFoundError:
        raise DataError(f"data.texts.{lang}: {source} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.texts.{lang}: {source} cannot be read as UTF-8 text: {err}") from None
    texts = []
    for n, line in enumerate(lines, 1):
        if suffix == ".jsonl":
            if not line.strip():
                continue  # blank lines between records, as in manifests
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{source} line {n}: not JSON ({err.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{source} line {n}: expected an object with a 'text' string, got {line[:80]!r}")
        else:
            text = line
        if not text.strip():
            raise DataError(f"{source} line {n}: an empty text; remove the line or give a text")
        texts.append(text.strip())
    if not texts:
        raise DataError(f"data.texts.{lang}: {source} holds no texts")
    return texts


def load_free_texts(spec: Mapping[str, Sequence[str]]) -> FreeTexts:
    """Read ``data.texts`` (language -> sources) into one :class:`FreeTexts`, deduplicated per language."""
    texts: list[str] = []
    fields: list[str] = []
    for lang, sources in spec.items():
        seen: dict[str, None] = {}
        for source in sources:
            seen.update(dict.fromkeys(_read_source(str(source), lang)))
        texts += list(seen)
        fields += [free_field(lang)] * len(seen)
    return FreeTexts(texts, fields, {lang: [str(s) for s in sources] for lang, sources in spec.items()})
