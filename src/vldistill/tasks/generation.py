"""Zero-shot VQA and captioning by generation with a seq2seq student (VLKD, ``METHODS.md`` sections 3 and 5).

The student never trains on a question or an answer: it answers by infilling. The teacher embeds the image, the
student turns that into its image prefix, the encoder reads ``[prefix; prompt]`` with the prompt a template around
the LM's mask token (``Question: {question} Answer: {mask}``, ``A picture of {mask}``), and the decoder writes. A
BART-style LM writes the whole prompt back with the mask filled in; a T5-style LM writes only the fill.
:func:`infill` extracts the fill either way. Generation is batched; greedy decoding by default, beam search with
``num_beams > 1``. Every setting is a :class:`~vldistill.config.GenerationConfig` field, printed with the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import GenerationConfig
from ..students.seq2seq_inputs import mask_token_of

TASKS = ("vqa", "captioning")


def check_teacher_fits(student: Any, teacher: Any, where: str = "the teacher") -> None:
    """Fail when the teacher's image output does not fit the student's prefix projection ``W_v``.

    Args:
        student: a seq2seq student.
        teacher: a dual encoder (its ``dims``).
        where: how to name the teacher in the message (its id or path).

    Raises:
        ValueError: naming the teacher, the width it gives and the width the prefix projection expects.
    """
    pooled = student.options.prefix == "pooled"
    width = teacher.dims.embed if pooled else teacher.dims.image_width
    what = "pooled image embedding" if pooled else "image tokens"
    expected = student.prefix_projection.in_features
    if width != expected:
        raise ValueError(
            f"{where} gives a {what} of width {width}, but the student's image prefix projection expects width "
            f"{expected} (prefix: {student.options.prefix}): the student was aligned to another teacher"
        )


def teacher_image(student: Any, teacher: Any, images: Sequence[Any]) -> Tensor:
    """What the student's prefix is built from: the teacher's pooled image embeddings ``[B, d_T]`` or, with
    ``prefix: tokens``, its image tokens ``[B, n, h_T]``."""
    pixel_values = teacher.preprocess_images(list(images))
    with torch.no_grad():
        out = teacher.encode_image(pixel_values, return_tokens=student.options.prefix == "tokens")
    return out[1] if isinstance(out, tuple) else out


def prompt_for(template: str, mask_token: str, question: str | None = None, where: str = "sample") -> str:
    """The template with the question (VQA) and the mask token filled in; an empty question is an error."""
    if "{question}" in template:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: the question is empty or not a string: {question!r}")
        return template.format(question=question.strip(), mask=mask_token)
    return template.format(mask=mask_token)


def check_prompt_length(student: Any, prompt: str, where: str = "sample") -> None:
    """Fail when a prompt does not fit the LM: truncating it would cut off the mask it is asked to fill.

    The limit is the student's tokenisation length (``max_length`` option, default ``min(tokenizer limit, 128)``)
    and the LM's positions minus the image prefix.
    """
    n = len(student.tokenizer(prompt, verbose=False)["input_ids"])
    limit = student.processor().max_length
    positions = getattr(student.model.config, "max_position_embeddings", None)
    prefix = student.options.prefix_tokens if student.options.prefix == "pooled" else None
    if positions and prefix is not None:
        limit = min(limit, positions - prefix)
    if n > limit:
        raise ValueError(
            f"{where}: the prompt is {n} tokens long ({prompt[:80]!r}{'...' if len(prompt) > 80 else ''}); the LM "
            f"reads at most {limit} (its max_length and positions, less the image prefix); shorten the question"
        )


def infill(output: str, before: str, after: str, tokenizer) -> str:
    """The part of a generated text that fills the prompt's mask.

    ``before`` and ``after`` (the prompt around the mask) are written the way the tokenizer decodes them (e.g.
    lower-cased, spaces around punctuation), as the generated text is. When the output starts with ``before`` it is
    cut off; otherwise the longest tail of ``before`` (in words; one word only when it has four letters or more,
    such as ``Answer``) found in the output is, from its last occurrence (an LM that rephrased the question still
    reaches ``Answer:``); otherwise the output is the fill (a T5-style LM writes only the fill). ``after`` is cut
    from the end when present.

    Args:
        output: the decoded generated text (special tokens skipped).
        before: the prompt's text before the mask.
        after: the prompt's text after the mask.
        tokenizer: the LM's tokenizer.
    """
    text = " ".join(output.split())
    head, tail = _decoded(before, tokenizer), _decoded(after, tokenizer)
    low = text.lower()
    if head and low.startswith(head.lower()):
        text = text[len(head) :]
    elif head:
        words = head.split()
        least = 1 if len(words) == 1 or sum(ch.isalpha() for ch in words[-1]) >= 4 else 2  # "answer", not "of"
        for k in range(len(words), least - 1, -1):
            anchor = " ".join(words[-k:]).lower()
            at = low.rfind(anchor)
            if at >= 0:
                text = text[at + len(anchor) :]
                break
    text = text.strip().lstrip(":;,-").strip()  # what the anchor left: "answer" of "answer :"
    if tail and text.lower().endswith(tail.lower()):
        text = text[: -len(tail)]
    return text.strip()


def _around(prompt: str, mask: str) -> tuple[str, str]:
    before, _, after = prompt.partition(mask)
    return before, after


def _decoded(text: str, tokenizer) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


def decoding(gen: GenerationConfig) -> dict[str, int]:
    """The ``generate`` settings of a :class:`~vldistill.config.GenerationConfig`."""
    return {
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": gen.num_beams,
        "no_repeat_ngram_size": gen.no_repeat_ngram_size,
    }


def generative_predictor(student: Any, teacher: Any, task: str, generation: GenerationConfig | None = None):
    """A predictor (``samples -> answers or captions``) of a seq2seq student for the ``vqa`` or ``captioning`` task.

    Args:
        student: a seq2seq student (``Seq2SeqStudent``).
        teacher: the teacher it was aligned to (a dual encoder): it embeds the images.
        task: ``vqa`` (samples with ``question``) or ``captioning`` (image-caption pairs).
        generation: prompts and decoding; default :class:`~vldistill.config.GenerationConfig`.

    Raises:
        ValueError: another task, no teacher, a teacher whose image width does not fit the prefix; when predicting,
            an empty question or a prompt longer than the LM reads (each naming the sample).
    """
    if task not in TASKS:
        raise ValueError(f"a seq2seq student answers {', '.join(TASKS)} by generation, not {task!r}")
    if teacher is None:
        raise ValueError("a seq2seq student generates from the teacher's image outputs: give its teacher (teacher=)")
    check_teacher_fits(student, teacher)
    gen = generation or GenerationConfig()
    template = gen.vqa_template if task == "vqa" else gen.caption_template
    mask = mask_token_of(student.tokenizer, student.options.mask_token)

    def predict(samples: list[dict[str, Any]]) -> list[str]:
        prompts = []
        for k, s in enumerate(samples):
            where = f"sample {s.get('index', k)!r}"
            prompt = prompt_for(template, mask, s.get("question") if task == "vqa" else None, where)
            check_prompt_length(student, prompt, where)
            prompts.append(prompt)
        image = teacher_image(student, teacher, [s["image"] for s in samples])
        texts = student.generate(image, prompts, **decoding(gen))
        return [
            infill(text, *_around(prompt, mask), student.tokenizer) for prompt, text in zip(prompts, texts, strict=True)
        ]

    return predict
