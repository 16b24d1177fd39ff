"""The ``vldistill`` command line: quickstart, fit, eval, info.

Sits on top of the library; nothing in the library imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(output_dir=args.output, teacher=args.teacher, fast=args.fast, seed=args.seed)
    return 0


def _cmd_fit(args: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_recipe, parse_overrides
    from .pipeline import fit_recipe

    overrides = parse_overrides(extra)
    if args.teacher:
        overrides["teacher.name_or_path"] = args.teacher
    if args.output:
        overrides["train.output_dir"] = args.output
    cfg = load_recipe(args.recipe, overrides, tiny=args.tiny)
    result = fit_recipe(cfg, resume=args.resume)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import DataConfig
    from .pipeline import evaluate_model

    data = DataConfig(eval=args.data, eval_split=args.split, limit_eval=args.limit, image_root=args.image_root)
    metrics = evaluate_model(args.model, data, languages=args.languages, teacher=args.teacher)
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    from .config import RECIPES
    from .data import DATASETS
    from .losses import LOSSES
    from .models import FAMILIES
    from .students import STUDENTS

    sections = {
        "teachers (model families, from a hub id or directory)": FAMILIES.names(),
        "students (presets)": STUDENTS.names(),
        "losses": LOSSES.names(),
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
    f.add_argument("--output", help="shorthand for --train.output_dir")
    f.add_argument("--tiny", action="store_true", help="apply the recipe's tiny overrides (a run of seconds)")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")

    e = sub.add_parser(
        "eval",
        help="evaluate a saved student or teacher",
        description="Zero-shot classification and retrieval of any saved dual encoder (a student directory, "
        "a teacher directory or a hub id).",
    )
    e.add_argument("--model", required=True, help="directory or hub id of the model to evaluate")
    e.add_argument("--data", default="bundled:easyvqa", help="bundled:easyvqa, a manifest, or hf:NAME")
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    e.add_argument("--image-root", default=None, help="directory for relative image paths in a manifest")
    e.add_argument("--languages", nargs="+", default=None, help="languages to evaluate (default: all available)")
    e.add_argument("--teacher", help="also report top-1 agreement with this teacher")
    e.add_argument("--out", help="also write the metrics to this JSON file")

    i = sub.add_parser("info", help="list registered teachers, students, losses, recipes and datasets")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "fit":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "fit":
            return _cmd_fit(args, extra)
        return {"quickstart": _cmd_quickstart, "eval": _cmd_eval, "info": _cmd_info}[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"vldistill {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
