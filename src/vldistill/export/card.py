"""The Hugging Face model card (``README.md``) that every student vldistill exports carries.

The card opens with YAML metadata in the Hub's format (``library_name``, ``pipeline_tag``, ``tags``, ``language``,
``base_model`` where the teacher is a hub id, ``datasets``, ``metrics`` and a ``model-index`` with the measured
numbers), followed by prose: what the model is, the teacher it was distilled from (id or path and the SHA-256 of its
weights, :func:`vldistill.cache.teacher_identity`), the recipe with its full resolved config, the training data and
its size, the evaluation numbers with the machine and the date, and how to load it.

:func:`read_model_card` reads a card back (metadata dict, prose), which is how the tests check a card's numbers
against the run's ``eval.json``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import RecipeConfig, to_dict
from ..models import looks_like_path

MODEL_CARD = "README.md"

PIPELINE_TAGS = {
    "dual_encoder": "zero-shot-image-classification",
    "seq2seq": "image-text-to-text",
    "crossmodal": "visual-question-answering",
}
METRIC_TYPES = {"top1": "accuracy", "top5": "accuracy", "accuracy": "accuracy", "mean_per_class_recall": "recall"}


def machine() -> str:
    """This machine in one line: architecture, CPU threads, torch version."""
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, {platform.system()}"


def flat_numbers(entry: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a nested evaluation dict, keyed by its dotted path (``zeroshot.en.top1``)."""
    out: dict[str, float] = {}
    if isinstance(entry, dict):
        for key, value in entry.items():
            out.update(flat_numbers(value, f"{prefix}{key}."))
    elif isinstance(entry, int | float) and not isinstance(entry, bool):
        out[prefix.rstrip(".")] = float(entry)
    return out


def _teachers(cfg: RecipeConfig, teachers: Sequence[Any]) -> list[dict[str, Any]]:
    """Each recipe teacher's id or path, revision and weights hashes (read from the loaded teacher when given, else
    from its files)."""
    from ..cache import teacher_identity

    out = []
    for i, tcfg in enumerate(cfg.teachers):
        loaded = teachers[i] if i < len(teachers) else None
        entry: dict[str, Any] = {"id": tcfg.name_or_path, "revision": tcfg.revision, "languages": list(tcfg.languages)}
        try:
            ident = teacher_identity(loaded, tcfg.name_or_path, tcfg.revision)
        except Exception as err:  # a teacher that moved: the card says so rather than failing the export
            entry["weights_sha256"] = entry["files_sha256"] = None
            entry["note"] = f"not hashed: {err}"
        else:
            entry.update(id=ident["id"], weights_sha256=ident["weights"], files_sha256=ident["files"])
        out.append(entry)
    return out


def student_card(
    cfg: RecipeConfig,
    student: Any,
    teachers: Sequence[Any] = (),
    train_size: int | None = None,
    eval_result: dict[str, Any] | None = None,
    paired_size: int | None = None,
    when: _dt.datetime | None = None,
) -> str:
    """The model card of a student trained with ``cfg`` (text of ``README.md``).

    Args:
        cfg: the run's resolved recipe.
        student: the trained student (its ``kind``, parameter count and widths are reported).
        teachers: the loaded teachers (hashed from memory; otherwise from ``cfg.teachers``' files).
        train_size: training samples the run read.
        eval_result: the run's evaluation (``eval.json``: ``student`` and, where measured, ``teacher`` /
            ``baseline``); ``None``: the card says the model was not evaluated.
        paired_size: captioned samples the student could pair (``data.paired``), when not all.
        when: the date to report (default: now).
    """
    kind = getattr(student, "kind", "dual_encoder")
    if eval_result and "student" not in eval_result:  # a generative student's evaluation: its own tasks, one model
        measured = ("captioning", "vqa", "text_skill")  # not "generation": those are settings, not measurements
        eval_result = {"student": {k: v for k, v in eval_result.items() if k in measured and isinstance(v, dict)}}
    t_info = _teachers(cfg, teachers)
    languages = list(dict.fromkeys([*cfg.data.languages, *(cfg.eval.languages or [])]))
    numbers = flat_numbers((eval_result or {}).get("student", {}))
    meta: dict[str, Any] = {
        "library_name": "vldistill" if kind == "seq2seq" else "transformers",
        "pipeline_tag": PIPELINE_TAGS.get(kind, "feature-extraction"),
        "tags": list(dict.fromkeys(["vldistill", "knowledge-distillation", kind, cfg.name, cfg.student.preset])),
        "language": languages,
    }
    hub = [t["id"] for t in t_info if t["id"] and not looks_like_path(t["id"]) and not Path(t["id"]).exists()]
    if hub:
        meta["base_model"] = hub
    meta["teacher"] = [{k: t[k] for k in ("id", "weights_sha256", "files_sha256")} for t in t_info]
    meta["datasets"] = list(dict.fromkeys(d for d in (cfg.data.train, cfg.data.eval) if d))
    if paired_size is None and cfg.data.paired is not None and train_size:
        from ..data.splits import paired_indices

        paired_size = len(paired_indices(train_size, cfg.data.paired, cfg.data.split.seed))
    meta["metrics"] = sorted({METRIC_TYPES.get(k.rsplit(".", 1)[-1], "recall") for k in numbers}) or []
    when = when or _dt.datetime.now(_dt.UTC)
    if numbers:
        meta["model-index"] = [
            {
                "name": f"{cfg.name}-{kind}",
                "results": [
                    {
                        "task": {"type": meta["pipeline_tag"]},
                        "dataset": {"name": cfg.data.eval, "type": cfg.data.eval, "split": cfg.data.eval_split},
                        "metrics": [
                            {"type": METRIC_TYPES.get(k.rsplit(".", 1)[-1], "recall"), "name": k, "value": v}
                            for k, v in numbers.items()
                        ],
                    }
                ],
            }
        ]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    prose = _prose(cfg, student, kind, t_info, train_size, paired_size, eval_result, when)
    return f"---\n{front}---\n\n{prose}"


def _prose(cfg, student, kind, t_info, train_size, paired_size, eval_result, when) -> str:
    n_params = sum(p.numel() for p in student.parameters()) if hasattr(student, "parameters") else None
    dims = getattr(student, "dims", None)
    lines = [
        f"# {cfg.name}: a {kind} student distilled with vldistill",
        "",
        "## What it is",
        "",
        f"A `{kind}` student (preset `{cfg.student.preset}`"
        + (f", {n_params:,} parameters" if n_params else "")
        + (f", embedding width {dims.embed}" if dims is not None else "")
        + f") trained with the vldistill recipe `{cfg.name}` for {cfg.total_steps} steps of batch "
        f"{cfg.train.batch_size}, in {', '.join(cfg.data.languages)}.",
        "",
        "## Teacher",
        "",
    ]
    if t_info:
        lines += [
            "| teacher (id or path) | revision | weights SHA-256 | files SHA-256 | languages |",
            "|---|---|---|---|---|",
        ]
        for t in t_info:
            lines.append(
                f"| `{t['id']}` | {t['revision'] or '-'} | `{t.get('weights_sha256') or '-'}` | "
                f"`{t.get('files_sha256') or '-'}` | {', '.join(t['languages'])} |"
            )
        lines += ["", "Hashes: the first 32 hex digits of SHA-256 (`vldistill.cache.weights_digest` / `files_digest`)."]
    else:
        lines.append("None: this model was trained without a teacher (a baseline or a teacher trained from scratch).")
    lines += ["", "## Recipe", "", f"`{cfg.name}`; its stages:", ""]
    for stage in cfg.stages:
        losses = ", ".join(f"{t.weight:g} x {t.name}" for t in stage.losses)
        lines.append(f"- `{stage.name}`: {stage.steps} steps, {losses}; trains {', '.join(stage.trainable)}")
    lines += ["", "<details><summary>Full resolved config</summary>", "", "```yaml"]
    lines += [yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True).rstrip(), "```", "", "</details>"]
    size = f"{train_size:,} samples" if train_size is not None else "size not recorded"
    lines += ["", "## Training data", "", f"`{cfg.data.train}` (split `{cfg.data.train_split}`): {size}"]
    if paired_size is not None:
        lines[-1] += f", of which {paired_size:,} as image-caption pairs (the rest as unpaired images and captions)"
    lines[-1] += f"; task `{cfg.data.task}`, languages {', '.join(cfg.data.languages)}."
    lines += ["", "## Evaluation", ""]
    if eval_result:
        lines += [
            f"Measured on `{cfg.data.eval}` (split `{cfg.data.eval_split}`) on {when:%Y-%m-%d} on {machine()}:",
            "",
            "| metric | " + " | ".join(m for m in ("student", "teacher", "baseline") if m in eval_result) + " |",
        ]
        models = [m for m in ("student", "teacher", "baseline") if m in eval_result]
        lines.append("|---|" + "---|" * len(models))
        flat = {m: flat_numbers(eval_result[m]) for m in models}
        for key in flat["student"]:
            cells = [f"{flat[m][key]:.4f}" if key in flat[m] else "-" for m in models]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    else:
        lines.append("Not evaluated by the run that exported it (`vldistill eval --model THIS_DIR --data ...`).")
    lines += ["", "## How to load it", "", *_usage(kind), ""]
    return "\n".join(lines)


def _usage(kind: str) -> list[str]:
    if kind == "seq2seq":
        return [
            "- `lm/`: the LM and its tokenizer (`AutoModelForSeq2SeqLM.from_pretrained('lm')` loads it alone; it is "
            "still a text model).",
            "- `projections.safetensors`: the text-feature and image-prefix projections.",
            "- `teacher.json`: the teacher whose image encoder it reads (id or path, weights hash) and the generation "
            "settings.",
            "",
            "Answer or caption: `vldistill generate --model THIS_DIR --image PATH [--question TEXT]`.",
        ]
    if kind == "crossmodal":
        return [
            "```python",
            "from transformers import AutoProcessor, ViltForQuestionAnswering",
            "processor = AutoProcessor.from_pretrained('THIS_DIR')",
            "model = ViltForQuestionAnswering.from_pretrained('THIS_DIR').eval()",
            "logits = model(**processor(images=image, text=text, return_tensors='pt')).logits",
            "```",
            "",
            "`model.config.id2label` names the outputs: VQA the answers (`text`: the question), entailment "
            "`entailment`, `neutral`, `contradiction` (`text`: the hypothesis), multiple choice one `score` per "
            "image and `question + ' ' + candidate` (score each candidate, take the highest; for a rationale, "
            "`question + ' ' + right answer + ' ' + rationale`). `vldistill.students.load_student('THIS_DIR')` "
            "loads it as a student.",
        ]
    return [
        "```python",
        "from transformers import pipeline",
        "classify = pipeline('zero-shot-image-classification', model='THIS_DIR')",
        "classify(image, candidate_labels=['circle', 'triangle'], hypothesis_template='a photo of a {}.')",
        "```",
        "",
        "Or `vldistill.models.DualEncoder.from_pretrained('THIS_DIR')`; for onnxruntime: "
        "`vldistill export --model THIS_DIR --format onnx [--quantize int8]`.",
    ]


def write_student_card(directory: str | Path, cfg: RecipeConfig, student: Any, **kwargs: Any) -> Path:
    """Write :func:`student_card` as ``directory/README.md`` (replacing an earlier one); returns its path."""
    from ..files import follow_umask

    path = Path(directory) / MODEL_CARD
    path.write_text(student_card(cfg, student, **kwargs), encoding="utf-8")
    follow_umask(path)
    return path


def read_model_card(path: str | Path) -> tuple[dict[str, Any], str]:
    """A model card's YAML metadata and its prose; ``path``: the card or the model directory holding it.

    Raises:
        ValueError: the file does not open with a ``---`` YAML block.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_CARD
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{path}: a model card opens with YAML metadata between two '---' lines")
    front, prose = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its metadata block is not a YAML mapping")
    return meta, prose.lstrip("\n")
