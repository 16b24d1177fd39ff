"""MAD (Multimodal Adaptive Distillation): adapt the teacher to the task's data, then distil it with CLIP-TD.

A recipe with an ``adapt:`` section runs here (``fit_recipe`` hands it over):

1. the recipe's first teacher is fine-tuned as a dual-encoder student with the ``clip`` loss on (image, query + right
   answer) pairs of the recipe's training split, in the recipe's regime (low-shot, domain shift: what training may
   see, never the evaluation split):

   - VQA: ``question + " " + answer`` (the text field ``qa``, CLIP-TD's ``t_{y*}``);
   - entailment: the hypotheses labelled ``entailment`` only. A contradicted or neutral hypothesis does not describe
     its image, and a contrastive loss would pull the two together: training on them would teach the teacher that
     false statements match. (Contradictions could serve as hard negatives; that is another loss, not MAD's.)
   - multiple choice: ``question + " " + candidates[answer]`` (the right candidate, as the ``candidates`` field
     writes it);

2. the adapted teacher is saved as a Hugging Face model (``adapt.output_dir``, default
   ``OUTPUT_DIR/adapted-teacher``), loadable with ``transformers`` alone;
3. its zero-shot task accuracy is measured before and after on the recipe's evaluation split
   (``vldistill.tasks.predict.task_predictor``: VQA by the closest ``question + answer``, multiple choice by the closest
   ``question + candidate``; entailment has no zero-shot reading, since a similarity has no "neutral": reported as not
   applicable);
4. the recipe's stages (CLIP-TD) run with the adapted teacher in place of the original.

Sources: Wang et al., "Multimodal Adaptive Distillation for Leveraging Unimodal Encoders for Vision-Language Tasks"
(arXiv 2204.10496); METHODS.md section 4. Its adaptation is a contrastive fine-tune of the teacher on the
task's (image, correct text) pairs, as here.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..batching import TeacherSource
from ..config import ConfigError, RecipeConfig, load_recipe, to_dict
from ..data.sources import LabelledData
from ..data.tasks import ENTAILMENT_LABELS
from ..models import DualEncoder, Teacher, as_teacher
from ..tasks import get_task
from ..tasks.predict import task_predictor
from .loop import Trainer

#: The text field the adaptation pairs each image with, per task (the field name CLIP-TD's target uses).
ADAPT_FIELDS = {"vqa": "qa", "entailment": "hypothesis", "multiple_choice": "qa"}
ENTAILED = ENTAILMENT_LABELS.index("entailment")


class AdaptationPairs(Dataset):
    """The task's training items as image-text pairs for the teacher's contrastive adaptation.

    Items are ``{"index", "image", "captions": {field: text}, "label": -1}`` (what the collator reads from image-text
    pairs), one per training item; for entailment one per entailed hypothesis only.

    Args:
        dataset: a ``TaskDataset`` (or any dataset of task sample dicts) of the training split.
        task: ``vqa``, ``entailment`` or ``multiple_choice``.
    """

    def __init__(self, dataset, task: str):
        if task not in ADAPT_FIELDS:
            raise ConfigError(f"data.task = {task!r}: MAD adapts a teacher on vqa, entailment or multiple_choice data")
        self.data, self.task, self.field = dataset, task, ADAPT_FIELDS[task]
        self.languages = [self.field]
        if task == "entailment":  # read the labels from the sample records where there are some: no image decoding
            samples = getattr(dataset, "samples", None)
            labels = [s.label for s in samples] if samples is not None else [d["label"] for d in dataset]
            self.rows = [i for i, label in enumerate(labels) if label == ENTAILED]
        else:
            self.rows = list(range(len(dataset)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[self.rows[index]]
        return {"index": index, "image": item["image"], "captions": {self.field: self.text(item)}, "label": -1}

    def text(self, item: dict[str, Any]) -> str:
        """The right text of one task item (the same string the teacher embeds as CLIP-TD's target)."""
        if self.task == "vqa":
            return f"{item['question']} {item['answer']}"
        if self.task == "entailment":
            return item["hypothesis"]
        return f"{item['question']} {item['candidates'][item['answer_index']]}"


def adaptation_config(cfg: RecipeConfig, teacher: str, output_dir: Path) -> RecipeConfig:
    """The recipe of the adaptation: the teacher (``pretrained`` preset) trained with ``clip`` on the pairs' field."""
    a = cfg.adapt
    field = ADAPT_FIELDS.get(cfg.data.task)
    if field is None:
        raise ConfigError(f"adapt: data.task = {cfg.data.task!r}; MAD adapts on vqa, entailment or multiple_choice")
    raw = {
        "name": f"{cfg.name}-adapt",
        "student": {"preset": "pretrained", "name_or_path": teacher},
        "data": {"train": cfg.data.train, "eval": None, "languages": [field]},
        "stages": [
            {
                "name": "adapt",
                "steps": a.steps,
                "losses": [{"name": "clip", "langs": [field]}],
                "trainable": a.trainable,
            }
        ],
        "train": {
            **{k: v for k, v in to_dict(cfg.train).items() if k not in ("output_dir", "checkpoint_every")},
            "batch_size": a.batch_size,
            "lr": a.lr,
            "warmup_steps": a.warmup_steps,
            "keep_checkpoints": 1,
            "output_dir": str(output_dir),
        },
    }
    return load_recipe(raw=raw)


def adapted_teacher_dir(cfg: RecipeConfig) -> Path:
    return Path(cfg.adapt.output_dir or Path(cfg.train.output_dir) / "adapted-teacher")


def adapt_teacher(
    cfg: RecipeConfig, train: LabelledData, teacher: Teacher | None = None, resume: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the recipe's first teacher on the task's training pairs and save it; return its directory and a
    summary (steps, pairs, wall seconds, the last logged loss). A complete adapted teacher is reused on ``resume``.

    Args:
        cfg: a recipe with ``adapt:`` and a live first teacher.
        train: the recipe's training split, in its regime.
        teacher: the loaded original teacher (copied, never changed); default: loaded from the recipe.
        resume: reuse a complete adapted teacher, or continue an interrupted adaptation from its checkpoint.
    """
    tcfg = cfg.teachers[0]
    final = adapted_teacher_dir(cfg)
    work = Path(cfg.train.output_dir) / "adapt"
    if resume and (final / "config.json").is_file():
        return final, json.loads((work / "summary.json").read_text()) if (work / "summary.json").is_file() else {}
    pairs = AdaptationPairs(train.dataset, cfg.data.task)
    if len(pairs) < cfg.adapt.batch_size:
        raise ConfigError(
            f"adapt.batch_size = {cfg.adapt.batch_size}: the training split gives only {len(pairs)} adaptation pairs "
            f"({'entailed hypotheses' if cfg.data.task == 'entailment' else 'items'}); give a batch size of at most "
            f"{len(pairs)}"
        )
    if teacher is not None:  # a trainable copy: a Teacher encodes without autograd
        student = DualEncoder(copy.deepcopy(teacher.model), teacher.tokenizer, teacher.image_processor)
    else:
        student = DualEncoder.from_pretrained(tcfg.name_or_path, tcfg.revision, tcfg.trust_remote_code)
    student.model.requires_grad_(True)
    adapt_cfg = adaptation_config(cfg, str(tcfg.name_or_path), work)
    scale = student.logit_scale()  # the contrastive loss starts from the teacher's own scale
    if scale is not None:
        adapt_cfg.stages[0].losses[0].options["init_scale"] = min(float(scale), 100.0)
    trainer = Trainer(adapt_cfg, student, pairs)
    result = trainer.fit(resume=resume)
    summary = {
        "teacher": str(tcfg.name_or_path),
        "adapted_teacher": str(final),
        "pairs": len(pairs),
        "field": pairs.field,
        "steps": cfg.adapt.steps,
        "wall_seconds": round(result.wall_seconds, 2),
        "final": result.history[-1] if result.history else {},
    }
    if trainer.accelerator.is_main_process:
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the adapted teacher appears complete or not at all
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # a copy of the teacher and its optimiser state
    trainer.accelerator.wait_for_everyone()
    return final, summary


def zero_shot(teacher: DualEncoder, cfg: RecipeConfig, data: LabelledData, answers: Sequence[str]) -> dict[str, Any]:
    """The teacher's zero-shot task metrics on ``data`` (``vqa``, ``multiple_choice``); for a task a dual encoder
    cannot answer zero-shot (entailment), ``{"not_applicable": why}``."""
    task = get_task(cfg.data.task)
    try:
        predict = task_predictor(teacher, task.name, answers)
    except ValueError as err:
        return {"not_applicable": f"{err} (a similarity has no 'neutral' class)"}
    return task.evaluate(predict, data.dataset, batch_size=cfg.eval.batch_size)


def fit_mad(
    cfg: RecipeConfig,
    resume: bool = False,
    teachers: Sequence[Teacher] | None = None,
    student=None,
    train_data: LabelledData | None = None,
    eval_data: LabelledData | None = None,
    evaluate_after: bool = True,
    teacher_source: TeacherSource | None = None,
    baseline: bool = False,
) -> dict[str, Any]:
    """MAD end to end: adapt the first teacher (``cfg.adapt``), report its zero-shot accuracy before and after, then
    ``fit_recipe`` with the adapted teacher. The arguments are ``fit_recipe``'s; ``teachers`` are the original ones;
    ``baseline`` also trains the student without any teacher (``vldistill fit --baseline``).

    Returns ``fit_recipe``'s summary with ``adapt``: the adaptation's summary and ``zero_shot`` ``{"before",
    "after"}`` (also written to ``OUTPUT_DIR/adapt.json``).
    """
    from .fit import fit_recipe, load_eval_data, load_train_data

    if cfg.adapt is None:
        raise ConfigError("adapt: fit_mad needs a recipe with an adapt: section")
    if teacher_source is not None:
        raise ConfigError("adapt: MAD distils the adapted teacher live; a given teacher source would replace it")
    train_data = train_data or load_train_data(cfg.data)
    original = teachers[0] if teachers else None
    start = time.perf_counter()
    adapted, summary = adapt_teacher(cfg, train_data, original, resume=resume)
    from accelerate import PartialState

    main = PartialState().is_main_process
    if main and evaluate_after and cfg.data.eval:
        eval_data = eval_data or load_eval_data(cfg.data, cfg.eval.languages, train_data)
        answers = getattr(train_data.dataset, "answers", ())
        tcfg = cfg.teachers[0]
        before = original or as_teacher(DualEncoder.from_pretrained(tcfg.name_or_path, tcfg.revision))
        after = as_teacher(DualEncoder.from_pretrained(adapted))
        summary["zero_shot"] = {
            "before": zero_shot(before, cfg, eval_data, answers),
            "after": zero_shot(after, cfg, eval_data, answers),
        }
    summary["adapt_wall_seconds"] = round(time.perf_counter() - start, 2)
    summary["config"] = to_dict(cfg.adapt)
    distil = replace(cfg, adapt=None, teachers=[replace(cfg.teachers[0], name_or_path=str(adapted)), *cfg.teachers[1:]])
    loaded = None
    if teachers:  # the caller loaded the teachers: load the adapted one in the first one's place
        loaded = [as_teacher(DualEncoder.from_pretrained(adapted), cfg.teachers[0].languages), *list(teachers)[1:]]
    result = fit_recipe(
        distil,
        resume=resume,
        teachers=loaded,
        student=student,
        train_data=train_data,
        eval_data=eval_data,
        evaluate_after=evaluate_after,
        baseline=baseline,
    )
    result["adapt"] = summary
    if main:
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapt.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        if "zero_shot" in summary:
            print(format_zero_shot(summary["zero_shot"]), flush=True)
    return result


def format_zero_shot(zero_shot: dict[str, Any]) -> str:
    """One line: the teacher's zero-shot headline metric before and after adaptation."""

    def headline(metrics: dict[str, Any]) -> str:
        if "not_applicable" in metrics:
            return "n/a"
        value = metrics.get("accuracy", metrics.get("q2a"))
        return f"{100 * value:.1f}" if isinstance(value, int | float) else "?"

    before, after = headline(zero_shot["before"]), headline(zero_shot["after"])
    return f"MAD: the teacher's zero-shot task accuracy before / after adaptation: {before} / {after}"


__all__ = ["ADAPT_FIELDS", "AdaptationPairs", "adapt_teacher", "adaptation_config", "fit_mad", "zero_shot"]
