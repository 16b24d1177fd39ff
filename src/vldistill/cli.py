"""The ``vldistill`` command line: quickstart, fit, cache, eval, generate, info.

Sits on top of the library; nothing in the library imports it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

import yaml

from .config import ConfigError, EvalConfig


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .train.quickstart import run_quickstart

    run_quickstart(output_dir=args.output, teacher=args.teacher, fast=args.fast, seed=args.seed)
    return 0


def _cmd_fit(args: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_recipe, parse_overrides
    from .train.fit import fit_recipe

    overrides = parse_overrides(extra)
    if args.teacher:
        overrides["teacher.name_or_path"] = args.teacher
    if args.student:
        overrides["student.name_or_path"] = args.student
    if args.output:
        overrides["train.output_dir"] = args.output
    cfg = load_recipe(args.recipe, overrides, tiny=args.tiny)
    if args.student:
        _check_takes_checkpoint(cfg.student.preset)
    result = fit_recipe(cfg, resume=args.resume, baseline=args.baseline, overwrite=args.overwrite)
    from accelerate import PartialState

    if PartialState().is_main_process:  # launched on several processes: print the summary once
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _check_takes_checkpoint(preset: str) -> None:
    """``--student`` sets ``student.name_or_path``, which only presets built from a checkpoint read."""
    import inspect

    from .students import STUDENTS

    takes = [n for n in STUDENTS.names() if "name_or_path" in inspect.signature(STUDENTS.get(n)).parameters]
    if preset in STUDENTS and preset not in takes:
        raise ConfigError(f"--student: preset {preset!r} takes no checkpoint; presets that do: {', '.join(takes)}")


def _cmd_cache(args: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_recipe, parse_overrides
    from .train.fit import cache_recipe

    overrides = parse_overrides(extra)
    for flag, key in (
        ("dtype", "cache.dtype"),
        ("views", "cache.views"),
        ("batch_size", "cache.batch_size"),
        ("workers", "cache.workers"),
        ("shard_rows", "cache.shard_rows"),
        ("limit", "data.limit_train"),
        ("split", "data.train_split"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.tokens:
        overrides["cache.tokens"] = True
    if args.recipe:
        if args.teacher and len(args.teacher) > 1:
            raise ConfigError("--teacher: with a recipe, give at most one (it sets teacher.name_or_path)")
        if args.teacher:
            overrides["teacher.name_or_path"] = args.teacher[0]
        if args.data:
            overrides["data.train"] = args.data
        cfg = load_recipe(args.recipe, overrides, tiny=args.tiny)
    else:
        if not args.teacher or not args.data:
            raise ConfigError("give a recipe, or --teacher and --data (see vldistill cache --help)")
        if not args.output:
            raise ConfigError("--output: where to write the cache (a directory)")
        t_langs = args.teacher_languages or ["en"]
        raw = {
            "name": "cache",
            "teachers": [{"name_or_path": t, "languages": t_langs} for t in args.teacher],
            "data": {"train": args.data, "eval": None, "languages": args.languages or t_langs},
        }
        cfg = load_recipe(raw=raw, overrides=overrides)
    rank = _join_processes()  # under torchrun / accelerate launch: the processes build one cache together
    summary = cache_recipe(cfg, directory=args.output, rebuild=args.rebuild)
    summary["use_with"] = {"teacher.source": "cache", "teacher.cache": summary["cache"]}
    if rank == 0:
        print(json.dumps(summary, indent=2))
    _leave_processes()
    return 0


def _leave_processes() -> None:
    """Leave the process group cleanly (all processes done, then destroyed): a gloo group left to the interpreter's
    exit can abort a process ("terminate called without an active exception") after its work is done."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _join_processes() -> int:
    """This process's rank, after joining the process group of a multi-process launch (``WORLD_SIZE`` > 1: gloo on
    CPUs, NCCL on GPUs, one GPU per process by ``LOCAL_RANK``); 0 on one process."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not torch.distributed.is_initialized():
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if gpu else "gloo")
    return torch.distributed.get_rank()


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import DataConfig
    from .train.fit import EVAL_BATCH_SIZE, evaluate_model

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: it must be at least 1")
    if args.teacher_languages and not args.teacher:
        raise ConfigError("--teacher-languages: give --teacher too (the languages are the teacher's)")
    data = DataConfig(
        eval=args.data,
        eval_split=args.split,
        limit_eval=args.limit,
        image_root=args.image_root,
        classnames=_per_language("--classnames", args.classnames),
        templates=_per_language("--templates", args.templates),
    )
    metrics = evaluate_model(
        args.model,
        data,
        languages=args.languages,
        teacher=args.teacher,
        batch_size=args.batch_size or EVAL_BATCH_SIZE,
        teacher_languages=args.teacher_languages,
    )
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


def _per_language(flag: str, values: list[str] | None) -> dict[str, list[str]]:
    """``LANG=FILE`` (a .txt file with one entry per line, or a .json list) or ``LANG=a,b,c`` (inline), per language."""
    out: dict[str, list[str]] = {}
    for value in values or []:
        if "=" not in value and Path(value).suffix.lower() in (".yaml", ".yml", ".json") and Path(value).is_file():
            mapping = yaml.safe_load(Path(value).read_text(encoding="utf-8"))  # every language at once
            if not isinstance(mapping, dict):
                raise ConfigError(f"{flag} {value!r}: the file must hold a mapping of language -> list")
            out.update({str(k): [str(x) for x in v] for k, v in mapping.items()})
            continue
        lang, sep, spec = value.partition("=")
        if not sep or not lang or not spec:
            raise ConfigError(
                f"{flag} {value!r}: expected LANG=FILE, LANG=a,b,c or a YAML file of language -> list, "
                f"e.g. {flag} en=classes.txt"
            )
        path = Path(spec)
        if path.suffix.lower() in (".txt", ".json"):
            if not path.is_file():
                raise ConfigError(f"{flag} {value!r}: file {spec!r} not found")
            text = path.read_text(encoding="utf-8")
            entries = json.loads(text) if path.suffix.lower() == ".json" else text.splitlines()
        else:
            entries = spec.split(",")
        entries = [str(e).strip() for e in entries if str(e).strip()]
        if not entries:
            raise ConfigError(f"{flag} {value!r}: no entries")
        out[lang] = entries
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    from .train.vlkd import generate_from_export

    for flag, value in (("--num-beams", args.num_beams), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: it must be at least 1")
    result = generate_from_export(
        args.model, args.image, args.question, args.teacher, args.num_beams, args.max_new_tokens
    )
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.onnx import export_onnx

    if args.format != "onnx":
        raise ConfigError(f"--format {args.format!r}: only onnx is supported")
    suffix = "onnx-int8" if args.quantize else "onnx"
    output = Path(args.output) if args.output else Path(args.model) / suffix
    out = export_onnx(args.model, output, quantize=args.quantize)
    print(json.dumps({"model": args.model, "output": str(out), "quantize": args.quantize or "none"}, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .train.report import report_run

    written = report_run(args.run_dir, args.output)
    print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


def quiet_transformers() -> None:
    """Silence transformers' and the hub's progress bars and warnings (loading bars, "some weights were not
    initialised" notes) so that vldistill's own progress reads cleanly; ``--verbose`` keeps them."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    from .config import RECIPES
    from .data import DATASETS
    from .losses import LOSSES
    from .models import FAMILIES
    from .students import STUDENT_KINDS, STUDENTS
    from .tasks import TASKS

    sections = {
        "teachers (model families, from a hub id or directory)": FAMILIES.names(),
        "kinds (of student)": STUDENT_KINDS.names(),
        "students (presets)": STUDENTS.names(),
        "losses": LOSSES.names(),
        "tasks": TASKS.names(),
        "recipes": RECIPES.names(),
        "datasets": DATASETS.names(),
    }
    if args.json:
        print(json.dumps({"version": __version__, **{k.split(" ")[0]: v for k, v in sections.items()}}, indent=2))
        return 0
    print(f"vldistill {__version__}")
    for title, names in sections.items():
        print(f"\n{title}:")
        for name in names:
            print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vldistill", description="Vision-language knowledge distillation on Hugging Face models."
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep transformers' loading progress bars and warnings (quiet by default); before or after the command",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quickstart",
        help="distil a student from a teacher on bundled data and compare teacher, student and baseline",
        description="Offline, on the bundled easy-vqa data: trains (or loads) a teacher, distils a student at least "
        "8x smaller with recipes/dcclip.yaml, trains the same student without the teacher, evaluates all three in "
        "English and Chinese, and writes results.json, the student and a report.",
    )
    q.add_argument("--teacher", help="hub id or directory of a CLIP-family teacher (default: train a reference one)")
    q.add_argument("--fast", action="store_true", help="the same pipeline, smaller (under 2 minutes)")
    q.add_argument("--output", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    q.add_argument("--seed", type=int, default=0)

    f = sub.add_parser(
        "fit",
        help="run a recipe",
        description="Run a recipe (a YAML path or a registered name). Any config key can be overridden: "
        "--train.lr 1e-4 --stages.0.steps 50 --data.train my.jsonl",
        epilog="Example: vldistill fit dcclip --teacher openai/clip-vit-base-patch32 --train.batch_size 256",
    )
    f.add_argument("recipe", help="recipe YAML or name (vldistill info lists them)")
    f.add_argument("--teacher", help="shorthand for --teacher.name_or_path")
    f.add_argument("--student", help="shorthand for --student.name_or_path: the checkpoint to start from (e.g. a ViLT)")
    f.add_argument("--output", help="shorthand for --train.output_dir")
    f.add_argument("--tiny", action="store_true", help="apply the recipe's tiny overrides (a run of seconds)")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in the output dir (its checkpoints, metrics, student...); without it a directory "
        "holding another run is refused",
    )
    f.add_argument(
        "--baseline",
        action="store_true",
        help="also train the same student without the teacher (task loss only, same data, steps and batch size) "
        "and report student, baseline and teacher side by side with the gain",
    )

    c = sub.add_parser(
        "cache",
        help="run a teacher once over a dataset and store its outputs, to distil from them many times",
        description="Compute the teachers' outputs (pooled image and text embeddings; optionally token features and "
        "K augmented views per image) for a training set once, into sharded safetensors files with a "
        "manifest. Either from a recipe (its teachers and data.train; any config key can be overridden as in fit, "
        "e.g. --cache.views 4) or from --teacher and --data. A killed build resumes from its last complete shard. "
        "Train from it with --teacher.source cache --teacher.cache DIR.",
        epilog="Examples: vldistill cache dcclip --teacher openai/clip-vit-base-patch32 --output runs/cache/dcclip | "
        "vldistill cache --teacher openai/clip-vit-base-patch32 --data train.jsonl --output runs/cache/mine "
        "--dtype float16",
    )
    c.add_argument("recipe", nargs="?", help="recipe YAML or name (optional: or give --teacher and --data)")
    c.add_argument("--teacher", action="append", help="hub id or directory of a teacher (repeat for several)")
    c.add_argument(
        "--data", help="training data: bundled:easyvqa, a .jsonl/.csv manifest, hf:NAME, or wds:SHARDS/{0000..0099}.tar"
    )
    c.add_argument("--split", default=None, help="split for hf: and bundled data (default: train)")
    c.add_argument("--limit", type=int, default=None, help="cache only the first N training samples")
    c.add_argument("--languages", nargs="+", default=None, help="caption languages of the data (default: teacher's)")
    c.add_argument("--teacher-languages", nargs="+", default=None, help="languages the teacher reads (default: en)")
    c.add_argument("--output", help="cache directory (default with a recipe: its teacher.cache)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="storage dtype")
    c.add_argument("--tokens", action="store_true", help="also store token features")
    c.add_argument("--views", type=int, default=None, help="augmented views per image (default 1: none)")
    c.add_argument("--batch-size", type=int, default=None, help="samples per teacher forward (default 256)")
    c.add_argument("--workers", type=int, default=None, help="data-loading worker processes (default 2)")
    c.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: about 256 MB)")
    c.add_argument("--tiny", action="store_true", help="apply the recipe's tiny overrides")
    c.add_argument(
        "--rebuild",
        action="store_true",
        help="build the cache anew, whatever it holds (without it: a complete cache of the same data and settings "
        "is reused, its damaged shards recomputed, missing teachers added)",
    )

    e = sub.add_parser(
        "eval",
        help="evaluate a saved student or teacher",
        description="Zero-shot classification and retrieval of any saved dual encoder (a student directory, "
        "a teacher directory or a hub id).",
    )
    e.add_argument("--model", required=True, help="directory or hub id of the model to evaluate")
    e.add_argument("--data", required=True, help="the evaluation data: bundled:easyvqa, a manifest, or hf:NAME")
    e.add_argument(
        "--classnames",
        nargs="+",
        metavar="LANG=FILE_OR_LIST",
        help="zero-shot class names in label order: classes.yaml (language -> list), en=classes.txt (one per line, "
        "or a .json list) or en=cat,dog (bundled data has its own)",
    )
    e.add_argument(
        "--templates",
        nargs="+",
        metavar="LANG=FILE_OR_LIST",
        help="zero-shot prompt templates per language, each with {}: en=templates.txt or 'en=a photo of a {}.' "
        "(default: 'a photo of a {}.')",
    )
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    e.add_argument("--image-root", default=None, help="directory for relative image paths in a manifest")
    e.add_argument(
        "--languages", nargs="+", default=None, help="languages to evaluate (default: every language of the data)"
    )
    e.add_argument("--teacher", help="also report top-1 agreement with this teacher, in the languages it reads")
    e.add_argument("--teacher-languages", nargs="+", default=None, help="languages the teacher reads (default: en)")
    e.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images or texts per model call (default {EvalConfig().batch_size}: eval.batch_size)",
    )
    e.add_argument("--out", help="also write the metrics to this JSON file")

    g = sub.add_parser(
        "generate",
        help="answer a question about an image, or caption it, with a VLKD export",
        description="Load a seq2seq student exported by `vldistill fit` (a VLKD recipe) and its teacher (named in its "
        "teacher.json and checked by weights hash), embed the image with the teacher and generate: the answer to "
        "--question, or a caption without it. Prompts and decoding come from the export's recipe.",
        epilog="Example: vldistill generate --model runs/vlkd/student --image photo.png --question 'what color is it?'",
    )
    g.add_argument("--model", required=True, help="the export directory (OUTPUT_DIR/student of a VLKD run)")
    g.add_argument("--image", required=True, help="an image file")
    g.add_argument("--question", default=None, help="a question about the image (default: caption it)")
    g.add_argument("--teacher", default=None, help="the teacher's hub id or directory if it moved (same weights)")
    g.add_argument("--num-beams", type=int, default=None, help="beam search width (default: the recipe's)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="longest output (default: the recipe's)")

    x = sub.add_parser(
        "export",
        help="export a saved dual encoder (student or teacher) as ONNX towers for onnxruntime",
        description="Write the image tower and the text tower as ONNX models with a dynamic batch size, runnable with "
        "onnxruntime alone, with the tokenizer and the image-preprocessing settings (vldistill_onnx.json); "
        "--quantize int8 stores the towers' weights as int8 (onnxruntime dynamic quantisation).",
        epilog="Example: vldistill export --model runs/quickstart/student --format onnx --quantize int8",
    )
    x.add_argument("--model", required=True, help="directory or hub id of a dual encoder")
    x.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    x.add_argument("--quantize", choices=["int8"], default=None, help="int8: dynamic quantisation of the weights")
    x.add_argument("--output", help="output directory (default: MODEL/onnx, or MODEL/onnx-int8)")

    r = sub.add_parser(
        "report",
        help="write report.md, report.html and pictures for a fit run",
        description="Read a vldistill fit run (config.json, metrics.jsonl, eval.json, the exported student, its "
        "baseline and teacher) and draw each loss term on its own axis, the accuracies per language, per-class "
        "accuracy and test images with each model's prediction, into report.md + PNGs and one report.html.",
    )
    r.add_argument("run_dir", help="the run's output directory (train.output_dir)")
    r.add_argument("--output", help="where to write the report (default: RUN_DIR)")

    i = sub.add_parser("info", help="list registered teachers, students, losses, recipes and datasets")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _one_process(command: str) -> None:
    """Only ``fit`` and ``cache`` run on several processes; the other commands would each do (and write) the same
    work."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(
            f"vldistill {command} runs on one process, but this is one of {world} (WORLD_SIZE): run it without "
            "torchrun / accelerate launch (only vldistill fit and vldistill cache run on several processes)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # global: accepted before or after the command
    argv = [a for a in argv if a != "--verbose"]
    args, extra = parser.parse_known_args(argv)
    if not verbose:
        quiet_transformers()
    if extra and not (args.command == "fit" or (args.command == "cache" and args.recipe)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in ("quickstart", "eval", "generate", "export", "report"):
            _one_process(args.command)
        if args.command == "fit":
            return _cmd_fit(args, extra)
        if args.command == "cache":
            return _cmd_cache(args, extra)
        commands = {"quickstart": _cmd_quickstart, "eval": _cmd_eval, "info": _cmd_info, "generate": _cmd_generate}
        commands.update(export=_cmd_export, report=_cmd_report)
        return commands[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"vldistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"vldistill {args.command}: error: {err}", file=sys.stderr)  # names the file (vldistill.files)
        return 2


if __name__ == "__main__":
    sys.exit(main())
