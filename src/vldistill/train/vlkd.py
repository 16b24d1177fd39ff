"""VLKD runs on top of the library: the zero-shot evaluation of a seq2seq student after ``fit`` (VQA and captioning
by generation, the text skill before and after), its export (the LM, the prefix projection and ``teacher.json``) and
``vldistill generate`` from that export.

An export directory (``OUTPUT_DIR/student``)::

    lm/                        the aligned LM and its tokenizer: AutoModelForSeq2SeqLM / AutoTokenizer load it alone
    projections.safetensors    W_p (text projection) and W_v (image prefix projection)
    vldistill.json             the student's kind, widths and options (pooling, prefix, template, corruption)
    teacher.json               the teacher that embeds the images (id or path, revision, weights and file hashes,
                               widths) and the generation settings of the recipe
    README.md                  a model card: what was distilled from what, on what data, with which recipe

The teacher is not copied: it is a Hugging Face checkpoint of its own, named in ``teacher.json`` and checked by its
weights hash (``vldistill.cache.weights_digest``) when the export is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..cache import teacher_identity, weights_digest
from ..config import ConfigError, GenerationConfig, RecipeConfig, to_dict
from ..data.sources import LabelledData, load_task_data
from ..models import Teacher, load_teacher
from ..students import load_student
from ..students.seq2seq import Seq2SeqStudent
from ..students.seq2seq_inputs import mask_token_of
from ..tasks import get_task
from ..tasks.generation import check_prompt_length, check_teacher_fits, decoding, infill, prompt_for, teacher_image
from ..tasks.predict import task_predictor
from ..tasks.text_skill import denoising_skill

TEACHER_CARD = "teacher.json"
FORMAT = "vldistill-vlkd-export"


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_generative(
    student: Seq2SeqStudent,
    teacher: Teacher | None,
    eval_data: LabelledData,
    cfg: RecipeConfig,
    export_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Zero-shot captioning of ``data.eval`` (BLEU-4, CIDEr-D), zero-shot VQA of ``eval.vqa`` (VQA accuracy, overall
    and per question type) and the text skill of the LM before (``OUTPUT_DIR/student-init``) and after training,
    with the generation settings; printed and returned (and added to the model card of ``export_dir``).

    The captions are generated, scored and denoised in the student's language, ``data.languages[0]``: the caption
    language ``icti`` trains the LM to write (``zh`` in ``recipes/vlkd-zh.yaml``, whose Chinese captions are scored
    per character, :func:`~vldistill.tasks.metrics.tokenize_caption`).

    Raises:
        ConfigError: no teacher (the student generates from the teacher's image outputs), or evaluation captions
            without the student's language (``eval.languages`` leaves it out).
    """
    if teacher is None:
        raise ConfigError("teacher: a seq2seq student generates from its teacher's image outputs; the recipe has none")
    gen = cfg.eval.generation
    lang = cfg.data.languages[0]  # the student's caption language: the one icti corrupts and rebuilds
    loaded = getattr(eval_data.dataset, "languages", None)
    if loaded is not None and lang not in loaded:
        raise ConfigError(
            f"eval.languages = {cfg.eval.languages}: the evaluation captions ({cfg.data.eval}) are loaded in "
            f"{list(loaded)}, without {lang!r}, the student's caption language (data.languages[0]) that it is scored "
            f"in; add {lang!r} to eval.languages"
        )
    out: dict[str, Any] = {"generation": to_dict(gen), "teacher_id": cfg.teachers[0].name_or_path, "language": lang}
    captioning = get_task("captioning")
    predict = task_predictor(student, "captioning", teacher=teacher, generation=gen)
    out["captioning"] = captioning.evaluate(predict, eval_data.dataset, language=lang, batch_size=gen.batch_size)
    if cfg.eval.vqa:
        vqa_data = load_task_data(
            cfg.eval.vqa,
            "vqa",
            split=cfg.data.eval_split,
            limit=cfg.data.limit_eval,
            image_root=cfg.data.image_root,
            skip_bad=cfg.data.skip_bad,
            image_root_only=cfg.data.image_root_only,  # data.columns names the caption files' columns, not these
        )
        predict = task_predictor(student, "vqa", teacher=teacher, generation=gen)
        out["vqa"] = get_task("vqa").evaluate(predict, vqa_data, batch_size=gen.batch_size)
    if cfg.eval.text_skill:
        texts = [eval_data.dataset[i]["captions"][lang] for i in range(len(eval_data.dataset))]
        init_dir = Path(cfg.train.output_dir) / "student-init"
        before = load_student(init_dir) if (init_dir / "vldistill.json").is_file() else None
        out["text_skill"] = text_skill_side_by_side(before, student, texts, f"data.eval captions ({lang})")
    print(format_generative(out), flush=True)
    card = Path(export_dir) / TEACHER_CARD if export_dir is not None else None
    if card is not None and card.is_file():
        _model_card(card.parent, cfg, json.loads(card.read_text(encoding="utf-8")), out)
    return out


def text_skill_side_by_side(
    before: Seq2SeqStudent | None, after: Seq2SeqStudent, texts: Sequence[str], what: str
) -> dict[str, Any]:
    """The same text-only denoising evaluation of the LM before and after alignment (``before`` may be absent)."""
    o = after.options
    settings = {"mask_ratio": o.mask_ratio, "mean_span": o.mean_span, "max_length": after.processor().max_length}
    result: dict[str, Any] = {"texts": what}
    for name, model in (("before", before), ("after", after)):
        if model is not None:
            result[name] = denoising_skill(model.model, model.tokenizer, texts, **settings, mask_token=o.mask_token)
    result["name"] = result["after"]["name"]
    return result


def format_generative(result: dict[str, Any]) -> str:
    """The zero-shot results and the settings that produced them, as a few lines."""
    gen = result["generation"]
    search = "greedy" if gen["num_beams"] == 1 else f"beam search ({gen['num_beams']} beams)"
    lines = [
        f"generation: {search}, max_new_tokens {gen['max_new_tokens']}, no_repeat_ngram_size "
        f"{gen['no_repeat_ngram_size']}, vqa_template {gen['vqa_template']!r}, caption_template "
        f"{gen['caption_template']!r}"
    ]
    cap = result["captioning"]
    lang = result.get("language", "en")
    where = f"{cap['count']} images" if lang == "en" else f"{cap['count']} images, {lang} captions"
    lines.append(f"captioning ({where}): BLEU-4 {cap['bleu4']:.4f}, CIDEr-D {cap['cider']:.4f}")
    if "vqa" in result:
        vqa = result["vqa"]
        types = ", ".join(f"{t} {100 * v:.1f}" for t, v in vqa["by_type"].items())
        lines.append(f"VQA ({vqa['count']} questions): accuracy {100 * vqa['accuracy']:.1f} ({types})")
    if "text_skill" in result:
        skill = result["text_skill"]
        side = [f"{k} {100 * skill[k]['masked_token_accuracy']:.1f}" for k in ("before", "after") if k in skill]
        lines.append(f"text skill ({skill['name']}, {skill['texts']}): {', '.join(side)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- export
def write_teacher_card(
    directory: str | Path,
    cfg: RecipeConfig,
    teachers: Sequence[Teacher] = (),
    results: dict[str, Any] | None = None,
) -> Path:
    """``teacher.json`` (and a model card ``README.md``) beside a saved seq2seq student: the teacher that embeds
    the images (id or path, revision, SHA-256 of its weights and weight files, its widths) and the generation
    settings of the recipe."""
    directory = Path(directory)
    tcfg = cfg.teachers[0]
    teacher = teachers[0] if teachers else None
    if teacher is None:
        teacher = load_teacher(tcfg.name_or_path, tcfg.revision, tcfg.trust_remote_code)
    ident = teacher_identity(teacher, tcfg.name_or_path, tcfg.revision)
    card = {
        "format": FORMAT,
        "teacher": {
            "id": ident["id"],
            "revision": ident["revision"],
            "weights_sha256": ident["weights"],
            "files_sha256": ident["files"],
            "processor_sha256": ident["processor"],
            "hashes": "first 32 hex digits of SHA-256 (vldistill.cache.weights_digest / files_digest)",
            "dims": asdict(teacher.dims),
            "languages": list(getattr(teacher, "languages", ["en"])),
        },
        "generation": to_dict(cfg.eval.generation),
        "recipe": cfg.name,
    }
    path = directory / TEACHER_CARD
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    _model_card(directory, cfg, card, results)
    return path


def _model_card(directory: Path, cfg: RecipeConfig, card: dict[str, Any], results: dict[str, Any] | None) -> None:
    text = [
        f"# VLKD student (vldistill recipe `{cfg.name}`)",
        "",
        f"A sequence-to-sequence LM aligned with VLKD to the frozen image encoder of `{card['teacher']['id']}` on the "
        f"image-caption pairs of `{cfg.data.train}` ({cfg.total_steps} steps of batch {cfg.train.batch_size}).",
        "",
        "- `lm/`: the LM and its tokenizer (`AutoModelForSeq2SeqLM.from_pretrained('lm')` loads it alone; it is "
        "still a text model).",
        "- `projections.safetensors`: `W_p` (text feature) and `W_v` (image prefix) projections.",
        "- `teacher.json`: the teacher (id or path, weights hash) and the generation settings.",
        "",
        "Answer or caption: `vldistill generate --model THIS_DIR --image PATH [--question TEXT]`.",
    ]
    if results:
        text += ["", "Measured after training:", "", "```", format_generative(results), "```"]
    (directory / "README.md").write_text("\n".join(text) + "\n", encoding="utf-8")


def load_export(directory: str | Path, teacher: str | None = None) -> tuple[Seq2SeqStudent, Teacher, dict[str, Any]]:
    """A VLKD export and its teacher, checked to be the one the student was aligned to.

    Args:
        directory: the export (``OUTPUT_DIR/student``).
        teacher: the teacher's hub id or directory when it moved (default: the one ``teacher.json`` names); its
            weights must still hash as ``teacher.json`` says.

    Raises:
        FileNotFoundError: not an export (no ``vldistill.json`` or ``teacher.json``).
        ValueError: a teacher with other weights, or whose image width does not fit the prefix projection.
    """
    directory = Path(directory)
    if not (directory / "vldistill.json").is_file():
        raise FileNotFoundError(f"--model {directory}: not a VLKD export (no vldistill.json there)")
    card_path = directory / TEACHER_CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"--model {directory}: no {TEACHER_CARD} naming the teacher (was it exported by fit?)")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    student = Seq2SeqStudent.from_pretrained(directory).eval()
    spec = card["teacher"]
    name = teacher or spec["id"]
    model = load_teacher(name, None if teacher else spec.get("revision"), languages=spec.get("languages", ["en"]))
    check_teacher_fits(student, model, where=f"teacher {name}")  # the plainer message first
    expected = spec.get("weights_sha256")
    if expected and weights_digest(model.model) != expected:
        raise ValueError(
            f"teacher {name}: its weights hash {weights_digest(model.model)} differs from {expected}, the teacher "
            f"{spec['id']} that {directory} was aligned to ({card_path})"
        )
    return student, model, card


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from a file; an unreadable one is an error naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"--image {path}: cannot read the image ({err})") from None


def generate_from_export(
    model: str | Path,
    image: str | Path,
    question: str | None = None,
    teacher: str | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """``vldistill generate``: answer a question about an image (``question``) or caption it, from a VLKD export.

    The prompt templates and decoding come from the export's ``teacher.json`` (the recipe's ``eval.generation``);
    ``num_beams`` and ``max_new_tokens`` override them. Returns the answer or caption with the prompt, the raw
    generated text and every setting used.

    Raises:
        FileNotFoundError: no export or no image file.
        ValueError: an unreadable image, an empty question, a question too long for the LM, a teacher that does not
            fit; each message names the argument.
    """
    if question is not None and not question.strip():
        raise ValueError("--question is empty: give a question, or leave --question out to caption the image")
    picture = read_image(image)
    student, t_model, card = load_export(model, teacher)
    gen = GenerationConfig(**card.get("generation", {}))
    overrides = {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
    gen = GenerationConfig(**{**to_dict(gen), **{k: v for k, v in overrides.items() if v is not None}})
    task = "vqa" if question is not None else "captioning"
    mask = mask_token_of(student.tokenizer, student.options.mask_token)
    template = gen.vqa_template if task == "vqa" else gen.caption_template
    prompt = prompt_for(template, mask, question, "--question")
    check_prompt_length(student, prompt, "--question" if question is not None else "--image caption prompt")
    raw = student.generate(teacher_image(student, t_model, [picture]), [prompt], **decoding(gen))[0]
    before, _, after = prompt.partition(mask)
    return {
        "task": task,
        "answer" if task == "vqa" else "caption": infill(raw, before, after, student.tokenizer),
        "question": question,
        "image": str(image),
        "prompt": prompt,
        "generated": raw,
        "generation": to_dict(gen),
        "teacher": teacher or card["teacher"]["id"],
    }
