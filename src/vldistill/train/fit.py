"""Whole runs built from the library and the trainer: ``fit`` a recipe, ``eval`` a saved model.

Sits on top of the library (the CLI and the quickstart call it); nothing in the library imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..batching import TeacherSource, teacher_texts
from ..config import ConfigError, DataConfig, EvalConfig, RecipeConfig, load_recipe, to_dict
from ..data.sources import LabelledData, load_data, load_stream, load_task_data, streams
from ..data.splits import apply_split
from ..data.streaming import StreamRows
from ..data.texts import FreeTexts, load_free_texts
from ..evaluation import agreement, evaluate, mean_cosine
from ..export.card import write_student_card
from ..files import disk_errors, follow_umask
from ..models import DualEncoder, Teacher, load_teacher, prepare_teachers
from ..students import load_student, prepare_student
from ..tasks import get_task
from ..tasks.predict import task_predictor
from .loop import FitResult, Trainer, free_text_tables, open_run


def _load_split(cfg: DataConfig, source: str, split: str, languages: Sequence[str], limit: int | None) -> LabelledData:
    """One split of the recipe's data, read with the data section's shared options (columns, image root, ...)."""
    return load_data(
        source,
        split=split,
        languages=languages,
        limit=limit,
        image_root=cfg.image_root,
        columns=cfg.columns,
        skip_bad=cfg.skip_bad,
        classnames=cfg.classnames,
        templates=cfg.templates,
        image_root_only=cfg.image_root_only,
    )


def _load_task_split(cfg: DataConfig, source: str, split: str, limit: int | None, answers=None) -> LabelledData:
    dataset = load_task_data(
        source,
        cfg.task,
        split=split,
        limit=limit,
        image_root=cfg.image_root,
        columns=cfg.columns,
        skip_bad=cfg.skip_bad,
        answers=answers,
        image_root_only=cfg.image_root_only,
    )
    return LabelledData(dataset if cfg.rationales else dataset.without_rationales())


def training_samples(dataset: Any) -> Any:
    """What the trainer (and a teacher cache) reads of the training items: a multiple-choice item with rationales as
    its Q->A and QA->R samples (``TaskDataset.rationale_samples``), anything else as it is."""
    expand = getattr(dataset, "rationale_samples", None)
    return expand() if expand is not None else dataset


def load_train_data(cfg: DataConfig, stream: bool = False) -> LabelledData:
    """The training split, in the regime ``data.split`` names (low-shot, domain shift: the held-out items never
    reach training). With ``stream`` (what training asks for), a source that ``data.streaming`` streams comes as a
    stream (:func:`~vldistill.data.sources.load_stream`; the trainer refuses the options that select by index)."""
    if stream and streams(cfg.train, cfg.streaming):
        if cfg.task != "pairs":
            raise ConfigError(f"data.streaming: only image-caption pairs stream, not {cfg.task!r} task data")
        args = (cfg.train, cfg.train_split, cfg.languages, cfg.columns, cfg.shuffle_buffer)
        return load_stream(*args, image_root=cfg.image_root, image_root_only=cfg.image_root_only)
    if cfg.task != "pairs":
        train = _load_task_split(cfg, cfg.train, cfg.train_split, cfg.limit_train)
    else:
        train = _load_split(cfg, cfg.train, cfg.train_split, cfg.languages, cfg.limit_train)
    if cfg.split.low_shot is not None or cfg.split.domain_shift is not None:
        train.dataset = apply_split(cfg.split, train.dataset, None)[0]
    return train


def load_eval_data(
    cfg: DataConfig, languages: Sequence[str] | None = None, train: LabelledData | None = None
) -> LabelledData | None:
    """The evaluation split; under a domain shift only its held-out items (those training never saw). Task data is
    read with the training set's VQA answer vocabulary (``train``)."""
    if not cfg.eval:
        return None
    if cfg.task != "pairs":
        answers = getattr(train.dataset, "answers", None) if train is not None else None
        data = _load_task_split(cfg, cfg.eval, cfg.eval_split, cfg.limit_eval, answers or None)
    else:
        data = _load_split(cfg, cfg.eval, cfg.eval_split, languages or cfg.languages, cfg.limit_eval)
    if cfg.split.domain_shift is not None:
        if train is None:
            raise ConfigError("data.split.domain_shift: the evaluation split is chosen against the training data")
        shift_only = replace(cfg.split, low_shot=None)
        data.dataset = apply_split(shift_only, _unsplit_train(cfg, train), data.dataset)[1]
    return data


def _unsplit_train(cfg: DataConfig, train: LabelledData) -> Any:
    """The training data before the low-shot draw (the domain shift's check that training keeps items needs it);
    reloading is avoided when no low-shot draw was made."""
    if cfg.split.low_shot is None:
        return train.dataset
    if cfg.task != "pairs":
        return _load_task_split(cfg, cfg.train, cfg.train_split, cfg.limit_train).dataset
    return _load_split(cfg, cfg.train, cfg.train_split, cfg.languages, cfg.limit_train).dataset


def tokenizer_corpus(data: LabelledData, languages: Sequence[str], free_texts: FreeTexts | None = None) -> list[str]:
    """Captions (or, for task data, every text a teacher would embed and the answers), class names, templates and
    the free texts (``data.texts``) of image-text pairs: the text a trained tokenizer must cover."""
    if getattr(data.dataset, "streaming", False):  # a stream: its first captions (a bounded corpus), no image read
        return data.dataset.captions(languages, STREAM_CORPUS)
    if not hasattr(data.dataset, "languages"):  # task data: questions, hypotheses, candidates, answers
        corpus = []
        for i in range(len(data.dataset.samples)):
            texts = teacher_texts(data.dataset.samples[i])
            corpus += [t for v in texts.values() for t in ([v] if isinstance(v, str) else v)]
        return corpus + list(getattr(data.dataset, "answers", []))
    corpus = [s.captions[lang] for s in data.dataset.samples for lang in languages if lang in s.captions]
    for lang in languages:
        corpus += data.classnames.get(lang, []) + [t.replace("{}", "") for t in data.templates.get(lang, [])]
    return corpus + (free_texts.texts if free_texts is not None else [])


STREAM_CORPUS = 100_000
"""Captions of a streamed training source that a student's own tokenizer is trained on (the first in shard order)."""


def fit_recipe(
    cfg: RecipeConfig,
    resume: bool = False,
    teachers: Sequence[Teacher] | None = None,
    student: DualEncoder | None = None,
    train_data: LabelledData | None = None,
    eval_data: LabelledData | None = None,
    evaluate_after: bool = True,
    teacher_source: TeacherSource | None = None,
    baseline: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a recipe end to end: data, teachers, student, stages, export, evaluation.

    The run owns ``train.output_dir`` while it runs (:class:`~vldistill.train.rundir.RunDirectory`): a directory that
    holds another run's files is refused unless ``overwrite=True`` (``--overwrite``, which deletes them), ``resume``
    refuses a run started with another config (naming the keys that differ), and a second process is kept out.

    With ``baseline=True`` (``vldistill fit --baseline``) the same student (same tokenizer and initial weights, from
    ``OUTPUT_DIR/student-init``) is also trained without any teacher, with the recipe's task loss only, on the same
    paired data for the same steps and batch size (:func:`baseline_config`), into ``OUTPUT_DIR/baseline``; the
    evaluation then reports student, baseline and teacher side by side, with the student's gain.

    With ``teacher.source: cache`` the teachers' outputs come from their cache, opened and checked against the
    recipe, the training data and (when given) the loaded ``teachers``; the teacher models are then loaded only for
    what else needs them (a student preset built on the teacher, the evaluation's teacher comparison).
    ``teacher_source`` replaces where teacher outputs come from altogether.

    Returns a JSON-able summary: output paths, wall time, the last logged losses and the evaluation metrics.
    The student is exported to ``OUTPUT_DIR/student`` in Hugging Face format. In a multi-process run (``accelerate
    launch``, ``torchrun``) every process trains; only the main one exports and evaluates, the others return the
    summary without ``eval``.

    A recipe with ``adapt:`` (MAD) first adapts its teacher to the training split and then runs with the adapted
    one (:func:`vldistill.train.mad.fit_mad`).
    """
    with open_run(cfg, resume, overwrite):  # before student-init is read: it must be this run's
        return _fit_owned(
            cfg, resume, teachers, student, train_data, eval_data, evaluate_after, teacher_source, baseline, overwrite
        )


def _fit_owned(
    cfg, resume, teachers, student, train_data, eval_data, evaluate_after, teacher_source, baseline, overwrite
) -> dict[str, Any]:
    """:func:`fit_recipe` in a run directory this run owns."""
    if cfg.adapt is not None:
        from .mad import fit_mad

        return fit_mad(
            cfg, resume, teachers, student, train_data, eval_data, evaluate_after, teacher_source, baseline=baseline
        )
    train_data = train_data or load_train_data(cfg.data, stream=True)
    train_set = training_samples(train_data.dataset)  # multiple choice: Q->A and QA->R samples
    cached = any(t.source == "cache" for t in cfg.teachers)
    if cached:
        from ..cache import open_recipe_cache, read_manifest, recipe_cache_dir
        from ..students import takes_teacher

        if hasattr(train_set, "adopt_counts"):  # a stream finds its cache rows by the shard counts the cache stores
            train_set.adopt_counts((read_manifest(recipe_cache_dir(cfg)) or {}).get("source_shards"))
        teacher_source = teacher_source or open_recipe_cache(cfg, train_set, teachers)
        teachers = list(teachers or [])
        if not teachers and student is None and takes_teacher(cfg.student.preset):
            teachers = prepare_teachers(cfg)
    else:
        teachers = prepare_teachers(cfg, teachers)
    free = load_free_texts(cfg.data.texts) if cfg.data.texts and any(s.texts for s in cfg.stages) else None
    if student is None:
        corpus = tokenizer_corpus(train_data, cfg.data.languages, free)
        if resume and (Path(cfg.train.output_dir) / "student-init").is_dir():
            student = load_student(Path(cfg.train.output_dir) / "student-init")
        else:
            answers = getattr(train_data.dataset, "answers", None)
            dims = [t.dims for t in teachers] or list(getattr(teacher_source, "dims", ()))
            student = prepare_student(cfg, corpus, teachers=teachers, answers=answers, teacher_dims=dims)
    trainer = Trainer(cfg, student, train_set, teachers, teacher_source, (free, None) if free is not None else None)
    trainer._print(_widths(student, trainer.dims.teachers))
    main = trainer.accelerator.is_main_process  # several processes: only the main one writes and evaluates
    init_dir = Path(cfg.train.output_dir) / "student-init"
    if main and not init_dir.is_dir():  # the initial student (and its trained tokenizer): a resumed run rebuilds it
        _save_atomically(student, init_dir)  # other processes of a resumed run may look for it meanwhile
    trainer.accelerator.wait_for_everyone()
    result = trainer.fit(resume=resume)
    export_dir = result.output_dir / cfg.role
    summary: dict[str, Any] = {
        "output_dir": str(result.output_dir),
        f"{cfg.role}_dir": str(export_dir),
        "wall_seconds": round(result.wall_seconds, 2),
        "final": result.history[-1] if result.history else {},
    }
    if not main and not baseline:
        return summary
    if baseline:
        b_cfg = baseline_config(cfg, result.output_dir / "baseline")
        trainer._print(f"baseline: the same student without the teacher ({b_cfg.stages[0].losses[0].name} only)")
        b_student = load_student(init_dir)  # the same tokenizer and initial weights as the distilled student
        b_result = fit_recipe(b_cfg, resume, [], b_student, train_data, evaluate_after=False, overwrite=overwrite)
        summary["baseline_dir"] = b_result["student_dir"]
    if not main:
        return summary
    with disk_errors(export_dir):
        student.save_pretrained(export_dir)
    follow_umask(export_dir)  # safetensors writes 0600 files: a serving account could not read the export
    if getattr(student, "kind", "") == "seq2seq" and cfg.teachers:  # VLKD: the export names its teacher
        from .vlkd import write_teacher_card

        write_teacher_card(export_dir, cfg, teachers)
    card = {"teachers": teachers, "train_size": len(train_data.dataset)}  # the model card: README.md of the export
    write_student_card(export_dir, trainer.cfg, student, **card)  # the config it trained with (terms left out)
    skipped = getattr(train_data.dataset, "skipped", 0)
    if skipped:  # its summary was printed once, when the data was read
        summary["skipped_rows"] = skipped
    if evaluate_after and cfg.data.eval:
        eval_data = eval_data or load_eval_data(cfg.data, cfg.eval.languages, train_data)
        if cached and not teachers and cfg.teachers:  # trained from a cache: load the teacher only to compare
            teachers = prepare_teachers(cfg)
        teacher = teachers[0] if teachers else None
        b_model = load_student(summary["baseline_dir"]) if baseline else None
        if getattr(student, "kind", "") == "seq2seq":  # VLKD: zero-shot VQA and captioning by generation
            from .vlkd import evaluate_generative

            summary["eval"] = evaluate_generative(student, teacher, eval_data, cfg, export_dir)
        elif cfg.data.task != "pairs":
            summary["eval"] = evaluate_task(student, teacher, eval_data, train_data, cfg, b_model)
        else:
            check_zeroshot(eval_data, cfg.eval.languages, "data.classnames")
            summary["eval"] = compare(student, teacher, eval_data, cfg.eval.languages, cfg.eval.batch_size, b_model)
        own = summary["eval"]  # the exported model's scores under "student", as its model card reads them
        if cfg.role == "teacher":  # a teacher trained from scratch: its scores are filed as the teacher's
            summary["eval"] = {"teacher": own["student"], **{k: v for k, v in own.items() if k != "student"}}
        print(format_comparison(summary["eval"]), flush=True)
        (result.output_dir / "eval.json").write_text(json.dumps(summary["eval"], indent=2, ensure_ascii=False))
        write_student_card(export_dir, trainer.cfg, student, eval_result=own, **card)  # now with its numbers
    return summary


def _save_atomically(model: DualEncoder, directory: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then rename: readers see no directory or a complete one."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(tmp):
        model.save_pretrained(tmp)
    follow_umask(tmp)
    os.replace(tmp, directory)


def cache_recipe(
    cfg: RecipeConfig,
    directory: str | Path | None = None,
    rebuild: bool = False,
    teachers: Sequence[Teacher] | None = None,
    train_data: LabelledData | None = None,
) -> dict[str, Any]:
    """``vldistill cache``: run the recipe's teachers once over its training data and store their outputs in
    ``directory`` (default: the teachers' ``cache``). Resumes an interrupted build; reuses a complete one."""
    from ..cache import build_recipe_cache, recipe_cache_dir

    if not cfg.teachers:
        raise ConfigError("teachers: the recipe has no teacher whose outputs could be cached")
    directory = recipe_cache_dir(cfg, directory)  # before loading anything: fail fast without a directory
    if train_data is None and cfg.data.train.startswith("hf:") and streams(cfg.data.train, cfg.data.streaming):
        # a streamed hf: dataset (larger than memory, or remote): read in order, as the rows its stream will find
        rows = StreamRows(load_train_data(cfg.data, stream=True).dataset)
        return build_recipe_cache(cfg, prepare_teachers(cfg, teachers), rows, directory, rebuild=rebuild)
    train_data = train_data or load_train_data(cfg.data)
    teachers = prepare_teachers(cfg, teachers)
    rows = training_samples(train_data.dataset)
    result = build_recipe_cache(cfg, teachers, rows, directory, rebuild=rebuild)
    if cfg.data.texts and any(s.texts for s in cfg.stages):  # the free texts' table beside the shards
        from ..cache import recipe_fields, recipe_identities
        from ..cache.read import cached_teacher_entries

        free = load_free_texts(cfg.data.texts)
        fields = recipe_fields(cfg, rows, teachers)
        entries = cached_teacher_entries(directory, recipe_identities(cfg, teachers), fields)  # no data read again
        free_text_tables(cfg, free, teachers, (directory, entries))
        result["free_texts"] = len(free)
    return result


EVAL_BATCH_SIZE = EvalConfig().batch_size


def compare(
    student: DualEncoder,
    teacher: DualEncoder | None,
    data: LabelledData,
    languages: Sequence[str],
    batch_size: int = EVAL_BATCH_SIZE,
    baseline: DualEncoder | None = None,
) -> dict[str, Any]:
    """Evaluate a student (and its teacher, and its no-teacher baseline) and report teacher-student agreement and
    the student's gain over the baseline (zero-shot top-1, in points); ``batch_size`` images or texts per encoder
    call (``eval.batch_size``)."""
    eval_set = data.eval_set(languages)
    out = evaluate(student, eval_set, batch_size=batch_size)
    metrics: dict[str, Any] = {"student": out["metrics"]}
    if baseline is not None:
        metrics["baseline"] = evaluate(baseline, eval_set, batch_size=batch_size)["metrics"]
        zs, b_zs = metrics["student"]["zeroshot"], metrics["baseline"]["zeroshot"]
        metrics["gain_points"] = {
            lang: round(100 * (zs[lang]["top1"] - b_zs[lang]["top1"]), 2) for lang in zs if lang in b_zs
        }
    if teacher is not None:
        teacher_langs = [lang for lang in eval_set.languages if lang in _teacher_languages(teacher)]
        t_out = evaluate(teacher, eval_set, teacher_langs or None, batch_size=batch_size)
        metrics["teacher"] = t_out["metrics"]
        metrics["agreement"] = _agreement(out, t_out)
    return metrics


def evaluate_task(
    student: Any,
    teacher: DualEncoder | None,
    data: LabelledData,
    train: LabelledData,
    cfg: RecipeConfig,
    baseline: Any = None,
) -> dict[str, Any]:
    """The task's metrics (``data.task``) for the student and, where a dual encoder can answer the task zero-shot,
    for the teacher; entailment also reports a hypothesis-only text model fitted on the training split."""
    task = get_task(cfg.data.task)
    answers = getattr(train.dataset, "answers", ())
    options = {"batch_size": cfg.eval.batch_size}
    if cfg.data.task == "entailment":
        options["train"] = train.dataset
    out: dict[str, Any] = {"task": task.name, "data": cfg.data.eval, "split": to_dict(cfg.data.split)}
    out["student"] = task.evaluate(task_predictor(student, task.name, answers), data.dataset, **options)
    if baseline is not None:
        out["baseline"] = task.evaluate(task_predictor(baseline, task.name, answers), data.dataset, **options)
        key = _headline(out["student"])
        out["gain_points"] = {key: round(100 * (out["student"][key] - out["baseline"][key]), 2)}
    if teacher is not None:
        try:
            predict = task_predictor(teacher, task.name, answers)
        except ValueError as err:  # e.g. zero-shot entailment: a similarity has no "neutral"
            out["teacher"] = {"skipped": str(err)}
        else:
            out["teacher"] = task.evaluate(predict, data.dataset, **{k: v for k, v in options.items() if k != "train"})
    return out


def _headline(metrics: dict[str, Any]) -> str | None:
    """The name of a task's headline metric in its ``evaluate`` output (``None`` when it has none of them)."""
    return next((k for k in ("accuracy", "q2ar", "q2a", "cider") if k in metrics), None)


def _widths(student: Any, teacher_dims: Sequence[Any]) -> str:
    """One line naming the student's and the teachers' embedding widths (adapters are needed where they differ)."""
    mine = student.dims.embed
    theirs = ", ".join(str(d.embed) for d in teacher_dims) or "no teacher"
    n = sum(p.numel() for p in student.parameters())
    kind = getattr(student, "kind", "")
    return f"student: {kind} {n / 1e6:.2f}M parameters, embedding width {mine} (teacher: {theirs})"


def format_comparison(result: dict[str, Any]) -> str:
    """The evaluation as a few plain lines: each model's headline figures, and the gain over the baseline."""
    lines = []
    for name in ("teacher", "student", "baseline"):
        entry = result.get(name)
        if not entry or "skipped" in entry:
            continue
        if "zeroshot" in entry:
            figures = ", ".join(f"{lang.upper()} top-1 {100 * m['top1']:.1f}" for lang, m in entry["zeroshot"].items())
        elif _headline(entry) is not None:
            figures = f"{_headline(entry)} {100 * entry[_headline(entry)]:.1f}"
        else:  # e.g. a generative student's several tasks: eval.json has them all
            continue
        lines.append(f"{name:>8}: {figures or 'no zero-shot classes'}")
    for key, points in result.get("gain_points", {}).items():
        lines.append(f"    gain: student - baseline = {points:+.1f} points ({key})")
    return "\n".join(lines)


def baseline_config(cfg: RecipeConfig, output_dir: str | Path) -> RecipeConfig:
    """The recipe without its teacher: one stage of the recipe's total steps with the task loss only (``clip`` on
    every training language for image-text pairs, ``task`` for task data), on the paired samples only, training the
    groups any stage of the recipe trains; same student, data, batch size and seed."""
    raw = to_dict(cfg)
    raw["teachers"] = []
    raw["role"] = "student"  # the baseline of a teacher-role run is still a student beside it
    if cfg.data.task == "pairs":
        loss = {"name": "clip", "weight": 1.0, "label": None, "options": {"langs": list(cfg.data.languages)}}
    else:
        loss = {"name": "task", "weight": 1.0, "label": None, "options": {}}
    groups = list(dict.fromkeys(g for stage in cfg.stages for g in stage.trainable))
    stage = {"name": "contrastive" if cfg.data.task == "pairs" else "task", "steps": cfg.total_steps}
    raw["stages"] = [{**stage, "losses": [loss], "trainable": groups, "lr": None, "samples": "paired"}]
    raw["train"]["output_dir"] = str(output_dir)
    raw["tiny"] = {}
    return load_recipe(raw=raw)


def _agreement(out: dict[str, Any], t_out: dict[str, Any]) -> dict[str, float]:
    """Per language that both evaluations classified zero-shot: the fraction of equal top-1 predictions."""
    return {
        lang: agreement(out["predictions"][lang], t_out["predictions"][lang])
        for lang in t_out["predictions"]
        if lang in out["predictions"]
    }


def _teacher_languages(teacher: DualEncoder) -> list[str]:
    return getattr(teacher, "languages", ["en"])


def evaluate_model(
    model: str | Path,
    data: DataConfig,
    languages: Sequence[str] | None = None,
    teacher: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    teacher_languages: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``vldistill eval``: zero-shot classification and retrieval of a saved dual encoder.

    Args:
        model: directory or hub id of the model.
        data: the evaluation data (``data.eval`` and its split, limit, image root, columns, class names, ...).
        languages: languages to evaluate; ``None``: every caption language of the data (``data.languages`` is not
            used). A language the data lacks is an error naming it.
        teacher: directory or hub id of a teacher to report top-1 agreement with, in the languages it reads.
        batch_size: images or texts per encoder call (``eval.batch_size``).
        teacher_languages: the caption languages the teacher reads (default: English).
    """
    if not data.eval:
        raise ConfigError("nothing to evaluate: give --data")
    encoder = DualEncoder.from_pretrained(model)
    eval_data = _eval_data_in(data, languages)
    check_zeroshot(eval_data, languages or eval_data.dataset.languages, "--classnames")
    eval_set = eval_data.eval_set(languages)
    out = evaluate(encoder, eval_set, batch_size=batch_size)
    result: dict[str, Any] = {"model": str(model), "data": data.eval, "split": data.eval_split}
    result.update({"samples": len(eval_set.images), "params": encoder.num_parameters(), **out["metrics"]})
    if teacher:
        t_model = load_teacher(teacher, languages=teacher_languages or ("en",))
        t_langs = [lang for lang in eval_set.languages if lang in _teacher_languages(t_model)]
        if not t_langs:
            raise ConfigError(
                f"--teacher {teacher}: it reads {_teacher_languages(t_model)}, and the evaluation is in "
                f"{eval_set.languages} only; there is no language to compare the two in (--teacher-languages)"
            )
        t_out = evaluate(t_model, eval_set, t_langs, batch_size=batch_size)
        result["agreement"] = _agreement(out, t_out)
    return result


def check_zeroshot(data: LabelledData, languages: Sequence[str], key: str) -> None:
    """Never skip zero-shot classification silently: labelled data without class names is an error naming ``key``
    (the flag or recipe key that gives them); class names for only some of the evaluated languages is a warning."""
    ds = data.dataset
    labelled = any(s.label >= 0 for s in ds.samples)
    if not labelled:
        return
    if not data.classnames:
        raise ConfigError(
            f"{key}: the evaluation data has labels but no class names, so zero-shot classification cannot run; "
            f"give the class names in label order per language (e.g. {key} en=classes.txt)"
        )
    missing = [lang for lang in languages if lang in ds.languages and lang not in data.classnames]
    if missing:
        print(
            f"warning: {key} has no class names in {missing}: zero-shot classification is evaluated in "
            f"{sorted(data.classnames)} only (retrieval in every language)",
            flush=True,
        )


def _eval_data_in(data: DataConfig, languages: Sequence[str] | None) -> LabelledData:
    """The evaluation data in every caption language it has (``languages=None``), or in ``languages``: one the data
    lacks is an error naming it (with ``skip_bad``, samples without it are skipped instead)."""
    eval_data = _load_split(data, data.eval, data.eval_split, None, data.limit_eval)
    available = eval_data.dataset.languages
    missing = [lang for lang in languages or () if lang not in available]
    if not missing:
        return eval_data
    if data.skip_bad:  # some samples may have them: keep those
        return _load_split(data, data.eval, data.eval_split, languages, data.limit_eval)
    raise ConfigError(
        f"languages {missing}: the evaluation data {data.eval!r} has no caption in "
        f"{' or '.join(repr(lang) for lang in missing)} (for every sample); it has {available}"
    )


def image_ms_per_image(model: DualEncoder, images: Sequence, batch_size: int = 64, repeats: int = 10) -> float:
    """Milliseconds per image of the image tower alone (preprocessing excluded), batches of ``batch_size``,
    after warm-up, on this machine."""
    return image_ms_in_turns({"model": model}, images, batch_size, rounds=1, repeats=repeats)["model"]


def image_ms_in_turns(
    models: dict[str, DualEncoder], images: Sequence, batch_size: int = 64, rounds: int = 7, repeats: int = 2
) -> dict[str, float]:
    """:func:`image_ms_per_image` of several models measured in turns: each round times every model once
    (``repeats`` batches), and each model's figure is its median over the rounds. A change of the machine's load
    then reaches all the models alike, so their ratio (a speed-up) holds better than separate measurements do."""
    pixels = {name: model.preprocess_images(list(images)[:batch_size]) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            for _ in range(3):
                model.encode_image(pixels[name])
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    model.encode_image(pixels[name])
                times[name].append((time.perf_counter() - start) * 1000 / (repeats * len(pixels[name])))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def adapted_cosine(
    student: DualEncoder,
    teacher: DualEncoder,
    fit_images: Sequence,
    test_images: Sequence,
    teacher_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Mean cosine between teacher image embeddings and the student's mapped into the teacher's space by the
    least-squares linear adapter fitted on ``fit_images`` (the widths usually differ). ``teacher_embeddings``: the
    teacher's ``embed_images`` of ``fit_images`` and of ``test_images``, when the caller compares several students
    with one teacher (computed here otherwise)."""
    if teacher_embeddings is None:
        teacher_embeddings = teacher.embed_images(list(fit_images)), teacher.embed_images(list(test_images))
    xt, yt = teacher_embeddings
    adapter = torch.linalg.lstsq(student.embed_images(list(fit_images)), xt).solution
    return mean_cosine(student.embed_images(list(test_images)) @ adapter, yt)


__all__ = [
    "FitResult",
    "adapted_cosine",
    "cache_recipe",
    "compare",
    "evaluate_model",
    "fit_recipe",
    "image_ms_per_image",
]
