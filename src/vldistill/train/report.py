"""The report a person looks at: ``report.md`` with PNGs beside it, and one self-contained ``report.html``.

For the quickstart (:func:`write_report`, called with its results, training histories and models) and for any
``vldistill fit`` run (:func:`report_run`, ``vldistill report RUN_DIR``: it reads ``config.json``,
``metrics.jsonl``, ``eval.json`` and the exported ``student`` / ``baseline/student`` and the recipe's teacher).

Pictures:

- ``report-losses.png``: each loss term's curve on its own axis (terms differ in scale by orders of magnitude);
- ``report-accuracy.png``: each model's zero-shot top-1 per language (the teacher reads English only);
- ``report-classes.png``: per-class zero-shot top-1 (English) of teacher, student and baseline, sorted by how much
  the student loses to the teacher;
- ``report-examples.png``: test images with each model's prediction, right ones in green with a check mark.

Sits on top of the library (like the trainer and the CLI).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# rows of metrics.jsonl that are not loss terms
NOT_TERMS = {"stage", "stage_index", "step", "lr", "samples_per_second", "epoch"}
COLOURS = {"teacher": "#4c72b0", "student": "#dd8452", "baseline": "#55a868", "all_pairs": "#8172b3"}
GRID = 12  # test images in the examples grid


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------- pictures
def plot_losses(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """One axis per loss term (and the total ``loss``), one line per run that logged it; stages run one after the
    other on the step axis."""
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for run, rows in histories.items():
        offset, last_stage, last_step = 0, None, 0
        for row in rows:
            if last_stage is not None and row.get("stage_index") != last_stage:
                offset = last_step
            last_stage = row.get("stage_index")
            step = offset + int(row.get("step", 0))
            last_step = step
            for key, value in row.items():
                if key in NOT_TERMS or "/" in key or not isinstance(value, int | float):
                    continue
                xs, ys = series.setdefault(key, {}).setdefault(run, ([], []))
                xs.append(step)
                ys.append(float(value))
    if not series:
        return None
    terms = sorted(series, key=lambda k: (k == "loss", k))  # the total last
    plt = _plt()
    cols = min(3, len(terms))
    rows_n = (len(terms) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        for run, (xs, ys) in series[term].items():
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=run, color=_colour(run))
        ax.set_title(term if term != "loss" else "loss (weighted total)", fontsize=10)
        ax.set_xlabel("step (stages in sequence)", fontsize=8)
        if all(y > 0 for _, ys in series[term].values() for y in ys):
            values = [y for _, ys in series[term].values() for y in ys]
            if max(values) / max(min(values), 1e-12) > 20:
                ax.set_yscale("log")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(terms) :]:
        ax.axis("off")
    fig.suptitle("training: each loss term on its own axis", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _colour(name: str) -> str | None:
    return next((c for key, c in COLOURS.items() if name.startswith(key)), None)


def plot_accuracy(accuracy: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: each model's zero-shot top-1 (%) per language; a language a model does not read is marked."""
    plt = _plt()
    langs = sorted({lang for v in accuracy.values() for lang in v}, key=lambda x: (x != "en", x))
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(langs), 3.6))
    width = 0.8 / max(len(accuracy), 1)
    for k, (name, per_lang) in enumerate(accuracy.items()):
        shift = (k - (len(accuracy) - 1) / 2) * width
        for i, lang in enumerate(langs):
            x = i + shift
            if lang in per_lang:
                v = 100 * per_lang[lang]
                ax.bar(x, v, width, color=_colour(name), label=name if i == 0 or lang == langs[0] else None)
                ax.text(x, v + 1, f"{v:.1f}", ha="center", fontsize=8)
            else:
                ax.text(x, 2, f"{name}: not read", ha="center", fontsize=7, rotation=90, color="grey")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right")
    ax.set_xticks(range(len(langs)), [f"{lang.upper()} zero-shot top-1" for lang in langs])
    ax.set(ylabel="%", ylim=(0, 105), title="accuracy per language (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def per_class_accuracy(predictions: Sequence[int], labels: Sequence[int], n_classes: int) -> list[float | None]:
    """Top-1 per class (``None`` for a class absent from ``labels``)."""
    out: list[float | None] = []
    for c in range(n_classes):
        idx = [i for i, y in enumerate(labels) if y == c]
        out.append(sum(predictions[i] == c for i in idx) / len(idx) if idx else None)
    return out


def plot_per_class(
    predictions: dict[str, Sequence[int]], labels: Sequence[int], classnames: Sequence[str], path: Path
) -> Path:
    """Horizontal grouped bars of per-class top-1; classes sorted by the student's loss against the teacher."""
    plt = _plt()
    acc = {name: per_class_accuracy(p, labels, len(classnames)) for name, p in predictions.items()}
    present = [c for c in range(len(classnames)) if any(a[c] is not None for a in acc.values())]
    ref, mine = acc.get("teacher"), acc.get("student")
    if ref is not None and mine is not None:
        present.sort(key=lambda c: (mine[c] or 0) - (ref[c] or 0))  # the biggest losses at the top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(present) * max(1, len(acc)) / 2))
    height = 0.9 / max(len(acc), 1)
    for k, (name, values) in enumerate(acc.items()):
        ys = [i + (k - (len(acc) - 1) / 2) * height for i in range(len(present))]
        ax.barh(ys, [100 * (values[c] or 0) for c in present], height, color=_colour(name), label=name)
    for i in range(len(present) - 1):  # a rule between classes: which bars belong to which label
        ax.axhline(i + 0.5, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.grid(axis="x", color="#eeeeee")
    ax.set_yticks(range(len(present)), [classnames[c] for c in present], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="top-1 within the class (%)", xlim=(0, 100))
    ax.set_title("per-class zero-shot top-1 (English), largest student loss vs the teacher first", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_examples(
    images: Sequence[Any],
    labels: Sequence[int],
    classnames: Sequence[str],
    predictions: dict[str, Sequence[int]],
    path: Path,
) -> Path:
    """A grid of test images, each captioned with its label and every model's prediction (green with a check mark
    when right, red with a cross when wrong)."""
    plt = _plt()
    n = min(len(images), GRID)
    cols = 4
    rows = (n + cols - 1) // cols
    lines = 1 + len(predictions)
    height = (2.6 + 0.3 * lines) * rows + 0.6  # each row: the image, then one line per model below it
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i])
        ax.set_title(f"true: {classnames[labels[i]]}", fontsize=8, fontweight="bold")
        for k, (name, preds) in enumerate(predictions.items()):
            right = preds[i] == labels[i]
            ax.text(
                0.5,
                -0.06 - 0.12 * k,
                f"{'✓' if right else '✗'} {name}: {classnames[preds[i]]}",
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=8,
                color="#1a7f37" if right else "#c62828",
            )
    fig.suptitle("test images and zero-shot predictions (English prompts)", fontsize=11, y=1 - 0.15 / height)
    # tight_layout ignores the prediction lines drawn below each image: leave room for them explicitly
    fig.subplots_adjust(
        left=0.01, right=0.99, top=1 - 0.7 / height, bottom=0.3 * lines / height, hspace=0.14 * lines + 0.25
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- predictions
@torch.no_grad()
def zeroshot_predictions(models: dict[str, Any], eval_set: Any, lang: str = "en", batch_size: int = 64) -> dict:
    """Each model's zero-shot top-1 prediction per test image in ``lang`` (models that cannot read it skipped)."""
    from ..evaluation import evaluate

    out = {}
    for name, model in models.items():
        if model is None or lang not in eval_set.classnames:
            continue
        out[name] = evaluate(model, eval_set, [lang], batch_size=batch_size)["predictions"][lang].tolist()
    return out


# ------------------------------------------------------------------------------------------------- documents
def _document(
    out: Path,
    title: str,
    intro: Sequence[str],
    table: str,
    pictures: list[tuple[str, Path | None]],
    notes: Sequence[str],
) -> dict[str, Path]:
    pictures = [(caption, p) for caption, p in pictures if p is not None]
    md = [f"# {title}", "", *intro, "", "```", table.strip(), "```", ""]
    for caption, p in pictures:
        md += [f"## {caption}", "", f"![{caption}]({p.name})", ""]
    md += [*notes, ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(x)}</p>" for x in intro if x)]
    body.append(f"<pre>{html.escape(table.strip())}</pre>")
    for caption, p in pictures:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        img = f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        body += [f"<h2>{html.escape(caption)}</h2>", img]
    body += [f"<p>{html.escape(x)}</p>" for x in notes if x]
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em}img{max-width:100%}pre{background:#f6f8fa;padding:1em;overflow-x:auto}</style></head>"
        f"<body>\n{chr(10).join(body)}\n</body></html>\n"
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    return {"md": out / "report.md", "html": out / "report.html", **{p.stem: p for _, p in pictures}}


def _pictures(
    out: Path,
    histories: dict[str, list[dict[str, Any]]],
    accuracy: dict[str, dict[str, float]],
    models: dict[str, Any] | None,
    test: Any,
    batch_size: int,
    losses_png: str = "report-losses.png",
    predictions: dict[str, list[int]] | None = None,
) -> list[tuple[str, Path | None]]:
    pictures = [("Loss terms", plot_losses(histories, out / losses_png))]
    if accuracy:
        pictures.append(("Accuracy per language", plot_accuracy(accuracy, out / "report-accuracy.png")))
    if models and test is not None:
        lang = "en" if "en" in test.classnames else next(iter(test.classnames), "en")  # the teacher reads English
        eval_set = test.eval_set([lang])
        preds = {}
        if lang in eval_set.classnames:  # the caller's predictions (English) when it has them, else computed here
            have = predictions if lang == "en" and predictions and set(models) <= set(predictions) else None
            preds = {n: have[n] for n in models} if have else zeroshot_predictions(models, eval_set, lang, batch_size)
        if preds:
            labels, names = eval_set.labels.tolist(), eval_set.classnames[lang]
            pictures.append(("Per-class accuracy", plot_per_class(preds, labels, names, out / "report-classes.png")))
            pictures.append(
                ("Test images", plot_examples(eval_set.images, labels, names, preds, out / "report-examples.png"))
            )
    return pictures


def write_report(
    out: Path,
    results: dict[str, Any],
    histories: dict[str, list[dict[str, Any]]],
    models: dict[str, Any] | None = None,
    test: Any = None,
    predictions: dict[str, list[int]] | None = None,
) -> dict[str, Path]:
    """The quickstart's report: its table, the loss terms of every run, the models' accuracies per language, and
    (with ``models`` and the ``test`` data) per-class accuracy and example predictions (``predictions``: each
    model's English zero-shot predictions on ``test`` when the caller has them; computed otherwise)."""
    from .quickstart import format_table

    names = [n for n in ("teacher", "student", "baseline", "all_pairs") if n in results]
    accuracy = {n: {lang: m["top1"] for lang, m in results[n]["zeroshot"].items()} for n in names}
    batch = results.get("setup", {}).get("batch_size", 64)
    # the loss terms keep the name report.png: the quickstart's README and earlier reports link to it
    pictures = _pictures(out, histories, accuracy, models, test, batch, "report.png", predictions)
    intro = [
        f"Machine: {results['setup']['machine']}. Wall time: {results['wall_seconds']} s. "
        f"Teacher: {results['setup']['teacher']}."
    ]
    free = results["setup"].get("free_texts", 0)
    also = f", and {free} texts without images," if free else ""
    notes = [
        "Student and baseline share architecture, tokenizer, initialisation, steps and batch size. The baseline "
        f"trains on the {results['setup']['paired_samples']} captioned images only (contrastive loss); the "
        f"student also uses the other training images and captions as unpaired data{also} in DC-CLIP's unimodal "
        "stage 1 (feature distillation from the teacher), then the same pairs in stage 2. `all_pairs`, for context: "
        "the same student without the teacher on every pair the teacher saw (what captioning everything would buy).",
        "",
        results["summary"],
    ]
    return _document(out, "vldistill quickstart report", intro, format_table(results), pictures, notes)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report_run(run_dir: str | Path, output: str | Path | None = None) -> dict[str, Path]:
    """``vldistill report RUN_DIR``: the report of a ``vldistill fit`` run, written into ``output`` (default: the
    run directory).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.json`` (not a fit run) or no ``eval.json`` (not evaluated).
    """
    from ..config import load_recipe
    from ..models import load_teacher
    from ..students import load_student
    from .fit import format_comparison, load_eval_data, load_train_data

    run = Path(run_dir)
    for name in ("config.json", "eval.json"):
        if not (run / name).is_file():
            what = "a vldistill fit run directory" if name == "config.json" else "an evaluated run (eval.json)"
            raise FileNotFoundError(f"{run}: no {name}; expected {what}")
    cfg = load_recipe(raw=json.loads((run / "config.json").read_text(encoding="utf-8")))
    ev = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    out = Path(output) if output else run
    out.mkdir(parents=True, exist_ok=True)
    histories = {"student": _read_rows(run / "metrics.jsonl")}
    if (run / "baseline" / "metrics.jsonl").is_file():
        histories["baseline"] = _read_rows(run / "baseline" / "metrics.jsonl")
    names = [n for n in ("teacher", "student", "baseline") if isinstance(ev.get(n), dict) and "zeroshot" in ev[n]]
    accuracy = {n: {lang: m["top1"] for lang, m in ev[n]["zeroshot"].items()} for n in names}
    models, test, notes = None, None, []
    pairs = cfg.data.task == "pairs" and (run / "student" / "config.json").is_file()
    if pairs and cfg.data.eval:
        models = {"student": load_student(run / "student")}
        if getattr(models["student"], "kind", "") != "dual_encoder":
            models = None
    if models is not None:
        t_path = cfg.teachers[0].name_or_path if cfg.teachers else None
        if t_path:
            try:
                models = {"teacher": load_teacher(t_path, cfg.teachers[0].revision), **models}
            except (OSError, ValueError) as err:
                notes.append(f"The teacher {t_path} could not be loaded ({err}); it is left out of the pictures.")
        if (run / "baseline" / "student").is_dir():
            models["baseline"] = load_student(run / "baseline" / "student")
        test = load_eval_data(
            cfg.data, cfg.eval.languages, load_train_data(cfg.data) if cfg.data.split.domain_shift else None
        )
    elif accuracy:
        notes.append(
            "Per-class accuracy and example predictions are drawn for dual-encoder students on image-text data"
        )
    pictures = _pictures(out, histories, accuracy, models, test, cfg.eval.batch_size)
    intro = [f"Run: {run.resolve()} (recipe `{cfg.name}`, {cfg.total_steps} steps of batch {cfg.train.batch_size})."]
    table = format_comparison(ev) or "(no headline figures: see eval.json)"
    return _document(out, f"vldistill report: {cfg.name}", intro, table, pictures, notes)
