"""The ``crossmodal`` student kind: a single-stream vision-language encoder with a task head (CLIP-TD / MAD).

Wang et al., "CLIP-TD: CLIP Targeted Distillation for Vision-Language Tasks" (arXiv 2201.05729) and its revision
"Multimodal Adaptive Distillation" (arXiv 2204.10496); see ``METHODS.md`` section 4. The papers used region-based
encoders (VL-BERT, UNITER); ViLT (Kim et al., ICML 2021) is the detector-free equivalent used here: the text tokens
and the image patches go through one transformer (text first, then an image [CLS] and the patches), and a head on
the pooled [CLS] state answers the task:

- ``vqa``: logits over the answer vocabulary, with ``ViltForQuestionAnswering``'s classifier layout
  (``Linear(h, 2h) -> LayerNorm -> GELU -> Linear(2h, A)``), so a fine-tuned student exports as one;
- ``entailment``: the same layout with 3 outputs (entailment, neutral, contradiction);
- ``multiple_choice``: every (question, candidate) pair encoded on its own, the same layout with 1 output,
  logits ``[B, C]``. One head scores both of VCR's problems: Q->A samples (question, candidate answers) and QA->R
  samples (question + right answer, candidate rationales), see ``TaskDataset.rationale_samples``.

Every task exports as a ``ViltForQuestionAnswering`` (:meth:`CrossModalStudent.save_pretrained`), whose classifier is
exactly this head: ``transformers`` alone loads and runs it. ``ViltForImageAndTextRetrieval`` (``rank_output``: one
``Linear(h, 1)``) and ``ViltForImagesAndTextClassification`` (hidden width ``h``, not ``2h``) do not fit the head.

The ``clip_td`` loss reads ``token_states``, ``cls_attention`` and the token masks to pick the tokens it distils;
its projection heads live in the loss, not here, so the exported student is clean.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    ViltConfig,
    ViltForQuestionAnswering,
    ViltImageProcessorPil,
    ViltModel,
)

from ..models import check_model_source, check_saved_model
from ..outputs import Embeddings, ModelDims
from .kinds import STUDENT_KINDS, STUDENT_OUTPUTS, StudentKind
from .presets import STUDENT_MEAN, STUDENT_STD, STUDENTS
from .seq2seq import CONFIG_NAME, read_config, sample_indices, sample_text, to_device, tokenizer_or_tiny

TASKS = ("vqa", "entailment", "multiple_choice")
ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")
HEAD_NAME = "head.safetensors"  # where exports before ViltForQuestionAnswering-for-every-task kept the head
MC_LABEL = "score"  # the one output of an exported multiple-choice head


def task_head(hidden: int, outputs: int, init_std: float = 0.02) -> nn.Sequential:
    """``Linear(h, 2h) -> LayerNorm(2h) -> GELU -> Linear(2h, outputs)``: ``ViltForQuestionAnswering.classifier``."""
    head = nn.Sequential(
        nn.Linear(hidden, hidden * 2), nn.LayerNorm(hidden * 2), nn.GELU(), nn.Linear(hidden * 2, outputs)
    )
    for layer in (head[0], head[3]):  # as ViltPreTrainedModel initialises its linear layers
        nn.init.normal_(layer.weight, std=init_std)
        nn.init.zeros_(layer.bias)
    return head


def vqa_score(answers: Sequence[str], answer: str) -> float:
    """VQA soft score of one vocabulary answer: ``min(1, #annotators who gave it / 3)`` (Antol et al., 2015)."""
    return min(1.0, sum(a == answer for a in answers) / 3)


# ------------------------------------------------------------------------------------------------ processor
class CrossModalProcessor:
    """Raw samples -> inputs of a :class:`CrossModalStudent` (picklable; see :meth:`__call__` for the layout).

    Args:
        tokenizer: the encoder's tokenizer.
        image_processor: its image processor (``ViltImageProcessorPil``: resize, normalise, pad + pixel mask).
        task: the student's task; every sample must be of this kind.
        max_length: text truncation length (the encoder's text positions).
        answers: the VQA answer vocabulary, for the soft ``answer_scores`` target (optional).
    """

    def __init__(self, tokenizer, image_processor, task: str, max_length: int, answers: Sequence[str] | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.task = task
        self.max_length = max_length
        self.answers = list(answers) if answers else None

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Tokenise the texts and preprocess the images of a batch of samples of the student's task.

        Returns:
            ``{"index": [B] long, "input_ids": [B, L] ([B, C, L] for multiple choice), "attention_mask": same
            shape, "pixel_values": [B, 3, H, W], "pixel_mask": [B, H, W], "targets": {"answer": [B] long}}``.
            Texts: VQA the question, entailment the hypothesis, multiple choice ``question + " " + candidate`` for
            each of the ``C`` candidates. ``answer``: VQA ``answer_index``, entailment ``label``, multiple choice
            ``answer_index``; VQA with a known answer vocabulary adds ``answer_scores`` ``[B, A]`` (soft scores).
        """
        if not samples:
            raise ValueError("the crossmodal processor got an empty batch")
        kinds = sorted({str(s.get("kind", "pair")) for s in samples})
        if kinds != [self.task]:
            raise ValueError(f"a crossmodal student for task {self.task!r} got {', '.join(kinds)} samples")
        images = self.image_processor(images=[s["image"] for s in samples], return_tensors="pt")
        inputs = {"index": sample_indices(samples), **self._texts(samples), "targets": self._targets(samples)}
        inputs["pixel_values"], inputs["pixel_mask"] = images["pixel_values"], images["pixel_mask"]
        return inputs

    def _texts(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if self.task == "vqa":
            return self._encode([sample_text(s, "question") for s in samples])
        if self.task == "entailment":
            return self._encode([sample_text(s, "hypothesis") for s in samples])
        counts = {len(s.get("candidates") or ()) for s in samples}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"multiple-choice samples of one batch need the same number (> 0) of candidates: {counts}")
        choices = counts.pop()
        texts = [f"{sample_text(s, 'question')} {c}" for s in samples for c in _candidates(s)]
        return {k: v.view(len(samples), choices, -1) for k, v in self._encode(texts).items()}

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _targets(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        key = "label" if self.task == "entailment" else "answer_index"
        targets = {"answer": torch.tensor([int(s[key]) for s in samples], dtype=torch.long)}
        if self.task == "vqa" and self.answers is not None:
            scores = [[vqa_score(s.get("answers") or [s["answer"]], a) for a in self.answers] for s in samples]
            targets["answer_scores"] = torch.tensor(scores, dtype=torch.float32)
        return targets


def _candidates(sample: Mapping[str, Any]) -> list[str]:
    for i, c in enumerate(sample["candidates"]):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"sample {sample.get('index')!r}: candidates[{i}] is empty or not a string: {c!r}")
    return list(sample["candidates"])


# -------------------------------------------------------------------------------------------------- student
@STUDENT_KINDS.register("crossmodal")
class CrossModalStudent(StudentKind):
    """A ``ViltModel`` and a task head.

    Parameter groups: ``embeddings`` (text and patch embeddings), ``encoder`` (the transformer layers and the final
    layer norm), ``pooler`` (the [CLS] pooler), ``head`` (the task head).

    Args:
        vilt: the encoder.
        tokenizer: its tokenizer.
        image_processor: its image processor.
        task: ``vqa``, ``entailment`` or ``multiple_choice``.
        answers: the VQA answer vocabulary (the head's labels, exported as ``id2label``).
        num_labels: VQA head size when no ``answers`` are given.
    """

    kind = "crossmodal"
    provides = frozenset({"task_logits", "token_states", "cls_attention"})

    def __init__(
        self,
        vilt: ViltModel,
        tokenizer,
        image_processor,
        task: str = "vqa",
        answers: Sequence[str] | None = None,
        num_labels: int | None = None,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not allowed; choose one of {', '.join(TASKS)}")
        if vilt.pooler is None:
            raise ValueError("a crossmodal student needs a ViltModel with its pooler (add_pooling_layer=True)")
        self.vilt = vilt
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.task = task
        self.labels = _labels(task, answers, num_labels)
        outputs = 1 if task == "multiple_choice" else len(self.labels)
        self.head = task_head(vilt.config.hidden_size, outputs, vilt.config.initializer_range)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def dims(self) -> ModelDims:
        h = self.vilt.config.hidden_size
        return ModelDims(embed=h, image_width=h, text_width=h)

    @property
    def device(self) -> torch.device:
        return next(self.vilt.parameters()).device

    @property
    def max_length(self) -> int:
        return int(self.vilt.config.max_position_embeddings)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, tuple[str, ...]]:
        return {
            "embeddings": ("vilt.embeddings.",),
            "encoder": ("vilt.encoder.", "vilt.layernorm."),
            "pooler": ("vilt.pooler.",),
            "head": ("head.",),
        }

    def processor(self) -> CrossModalProcessor:
        answers = self.labels if self.task == "vqa" else None
        return CrossModalProcessor(self.tokenizer, self.image_processor, self.task, self.max_length, answers)

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self, inputs: Mapping[str, Any], needs: Collection[str], teacher: Embeddings | None = None
    ) -> Embeddings:
        """Task logits, the fused sequence's last hidden states, the [CLS] attention and the token masks.

        ``extra`` holds ``task_logits`` (``[B, A]``, ``[B, 3]`` or ``[B, C]``), ``token_states`` ``[B, N, h]``,
        ``text_token_mask`` / ``image_token_mask`` ``[B, N]`` (bool: text tokens but [CLS], which come first;
        image patches but the image [CLS]; padding excluded) and, when needed, ``cls_attention`` ``[B, N]`` (the
        last layer's attention from [CLS] to each token, averaged over heads). For multiple choice the per-token
        outputs are those of the right candidate's sequence (``targets.answer``; without targets, the candidate the
        student scores highest): the one whose teacher text target ``t_y*`` the ``clip_td`` loss distils.

        Args:
            inputs: what :class:`CrossModalProcessor` returns.
            needs: outputs to compute beyond the always-present logits, states and masks.
            teacher: unused (the teacher's targets are read by the loss).
        """
        unknown = sorted((set(needs) & STUDENT_OUTPUTS) - self.provides)  # "teacher" etc. are not student outputs
        if unknown:
            raise ValueError(f"a crossmodal student cannot provide {unknown}; it provides {sorted(self.provides)}")
        inputs = to_device(inputs, self.device)
        flat, choices = _flatten_choices(inputs)
        states, masks, attention = self._encode(flat, "cls_attention" in needs)
        logits = self.head(self.vilt.pooler(states))
        text_len = flat["input_ids"].shape[1]
        extra = {"token_states": states, **_token_masks(masks, text_len)}
        if attention is not None:
            extra["cls_attention"] = attention
        if choices:
            logits = logits.view(-1, choices)
            rows = _chosen_rows(inputs.get("targets", {}).get("answer"), logits)
            extra = {k: v[rows] for k, v in extra.items()}
        return Embeddings(extra={"task_logits": logits, **extra})

    def _encode(self, inputs: Mapping[str, Tensor], attentions: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Last hidden states ``[B, N, h]``, the fused attention mask ``[B, N]`` and the [CLS] attention."""
        captured: list[Tensor] = []
        hook = self.vilt.embeddings.register_forward_hook(lambda _m, _i, out: captured.append(out[1]))
        try:
            out = self.vilt(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
                pixel_mask=inputs.get("pixel_mask"),
                output_attentions=attentions,
            )
        finally:
            hook.remove()
        attention = out.attentions[-1].mean(1)[:, 0] if attentions else None
        return out.last_hidden_state, captured[0], attention

    # --------------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """A ``ViltForQuestionAnswering`` directory (see :meth:`to_question_answering`) with the tokenizer, the image
        processor and ``vldistill.json``: ``transformers`` alone loads the model and answers through its head."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HEAD_NAME).unlink(missing_ok=True)  # an older export's separate head would shadow this one
        self.to_question_answering().save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        config = {"kind": self.kind, "task": self.task, "labels": list(self.labels)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def to_question_answering(self) -> ViltForQuestionAnswering:
        """The student as a ``ViltForQuestionAnswering`` with the same weights: its ``classifier`` is this head.

        ``id2label``: VQA the answer vocabulary; entailment ``entailment``, ``neutral``, ``contradiction``; multiple
        choice one output, ``score`` (the score of one image and ``question + " " + candidate``: encode each
        candidate and take the arg-max, as :meth:`forward` does).
        """
        labels = self.labels if self.labels else [MC_LABEL]
        config = copy.deepcopy(self.vilt.config)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        config.architectures = ["ViltForQuestionAnswering"]
        model = ViltForQuestionAnswering(config).to(self.device)
        model.vilt.load_state_dict(self.vilt.state_dict())
        model.classifier.load_state_dict(self.head.state_dict())
        return model.eval()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CrossModalStudent:
        """Load what :meth:`save_pretrained` wrote (or an earlier export: a ``ViltModel`` and ``head.safetensors``)."""
        directory = Path(directory)
        config = read_config(directory, cls.kind)
        task, labels = config["task"], config["labels"]
        tokenizer, image_processor = AutoTokenizer.from_pretrained(directory), _image_processor(directory)
        answers = labels if task == "vqa" else None
        if (directory / HEAD_NAME).is_file():  # exported before every task saved as ViltForQuestionAnswering
            vilt = ViltModel.from_pretrained(directory)
            student = cls(vilt, tokenizer, image_processor, task, answers=answers, num_labels=len(labels))
            student.head.load_state_dict(load_file(directory / HEAD_NAME))
            return student
        qa = ViltForQuestionAnswering.from_pretrained(directory)
        student = cls(qa.vilt, tokenizer, image_processor, task, answers=answers, num_labels=len(labels))
        student.head.load_state_dict(qa.classifier.state_dict())
        return student

    @classmethod
    def from_vilt(
        cls,
        name_or_path: str | os.PathLike,
        task: str = "vqa",
        answers: Sequence[str] | None = None,
        num_labels: int | None = None,
        tokenizer=None,
    ) -> CrossModalStudent:
        """A student on a ViLT checkpoint (hub id or directory, e.g. ``dandelin/vilt-b32-mlm``) and a new head.

        A ``ViltForQuestionAnswering`` checkpoint given without ``answers`` / ``num_labels`` keeps its head when it
        fits the task: for ``vqa`` any (with its labels), for ``entailment`` one labelled entailment, neutral,
        contradiction, for ``multiple_choice`` one with the single output ``score`` (what :meth:`save_pretrained`
        writes, so an export copied without ``vldistill.json`` still loads with its head).
        """
        path = str(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or path) if not _is_tokenizer(tokenizer) else tokenizer
        image_processor = _image_processor(path)
        config = AutoConfig.from_pretrained(path)
        if answers is None and num_labels is None and _head_fits(config, task):
            qa = ViltForQuestionAnswering.from_pretrained(path)
            labels = [qa.config.id2label[i] for i in range(qa.config.num_labels)]
            student = cls(qa.vilt, tokenizer, image_processor, task, answers=labels if task == "vqa" else None)
            student.head.load_state_dict(qa.classifier.state_dict())
            return student
        return cls(ViltModel.from_pretrained(path), tokenizer, image_processor, task, answers, num_labels)


def _head_fits(config, task: str) -> bool:
    """Whether a checkpoint's config is a ``ViltForQuestionAnswering`` whose classifier is a head for ``task``."""
    if "ViltForQuestionAnswering" not in (getattr(config, "architectures", None) or []):
        return False
    labels = tuple(config.id2label[i] for i in range(config.num_labels))
    if task == "entailment":
        return labels == ENTAILMENT_LABELS
    if task == "multiple_choice":
        return labels == (MC_LABEL,)
    return True


def _labels(task: str, answers: Sequence[str] | None, num_labels: int | None) -> list[str]:
    """The head's label names: the answer vocabulary, the entailment classes, or none (multiple choice)."""
    if task == "entailment":
        if num_labels not in (None, 3) or answers:
            raise ValueError("an entailment student has exactly 3 labels (entailment, neutral, contradiction)")
        return list(ENTAILMENT_LABELS)
    if task == "multiple_choice":
        if answers or num_labels not in (None, 0, 1):
            raise ValueError("a multiple_choice student scores each candidate; it takes no answers or num_labels")
        return []
    if answers:
        if len(set(answers)) != len(answers) or (num_labels is not None and num_labels != len(answers)):
            raise ValueError(f"answers must be {num_labels or len(answers)} distinct strings; got {len(answers)}")
        return [str(a) for a in answers]
    if not num_labels or num_labels < 1:
        raise ValueError("a vqa student needs its answer vocabulary (answers) or its size (num_labels)")
    return [f"answer_{i}" for i in range(num_labels)]


def _flatten_choices(inputs: Mapping[str, Any]) -> tuple[dict[str, Tensor], int]:
    """Multiple choice: ``[B, C, L]`` texts -> ``[B*C, L]`` and each image repeated ``C`` times; else unchanged."""
    ids = inputs["input_ids"]
    flat = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in inputs}
    flat["pixel_mask"] = inputs.get("pixel_mask")
    if ids.dim() != 3:
        return flat, 0
    choices = ids.shape[1]
    flat["input_ids"], flat["attention_mask"] = ids.flatten(0, 1), inputs["attention_mask"].flatten(0, 1)
    for key in ("pixel_values", "pixel_mask"):
        if flat[key] is not None:
            flat[key] = flat[key].repeat_interleave(choices, dim=0)
    return flat, choices


def _chosen_rows(answer: Tensor | None, logits: Tensor) -> Tensor:
    """Rows of the flattened ``[B*C]`` batch that hold each sample's chosen candidate."""
    choice = logits.argmax(1) if answer is None else answer.to(logits.device)
    return torch.arange(logits.shape[0], device=logits.device) * logits.shape[1] + choice


def _token_masks(masks: Tensor, text_len: int) -> dict[str, Tensor]:
    """Text tokens (but [CLS], position 0) and image patches (but the image [CLS], position ``text_len``)."""
    valid = masks.bool()
    text, image = valid.clone(), valid.clone()
    text[:, text_len:] = False
    text[:, 0] = False
    image[:, : text_len + 1] = False
    return {"text_token_mask": text, "image_token_mask": image}


def _image_processor(path: str | os.PathLike):
    return AutoImageProcessor.from_pretrained(str(path))


def _is_tokenizer(tokenizer) -> bool:
    return tokenizer is not None and not isinstance(tokenizer, str | os.PathLike)


def vilt_image_processor(size: int, patch_size: int, mean=STUDENT_MEAN, std=STUDENT_STD) -> ViltImageProcessorPil:
    """Resize the short side to ``size`` (the long side at most ``1333/800`` times it), both sides a multiple of the
    patch size, normalise, and pad a batch to its largest image (``pixel_mask`` marks the real pixels)."""
    return ViltImageProcessorPil(
        size={"shortest_edge": size}, size_divisor=patch_size, image_mean=list(mean), image_std=list(std)
    )


# -------------------------------------------------------------------------------------------------- presets
@STUDENTS.register("test-vilt")
def test_vilt(
    tokenizer=None,
    task: str = "vqa",
    answers: Sequence[str] | None = None,
    num_labels: int | None = None,
    **overrides: Any,
) -> CrossModalStudent:
    """Tiny ViLT for tests: hidden 32, 2 layers, 2 heads, FFN 64, 32px images in 16px patches, 40 text positions.

    Options: ``task``, ``answers`` / ``num_labels`` (VQA) and any ``ViltConfig`` field. Without a tokenizer it
    trains a tiny one (:func:`vldistill.students.seq2seq.tiny_tokenizer`).
    """
    tokenizer = tokenizer_or_tiny(tokenizer)
    defaults = ViltConfig()
    unknown = sorted(k for k in overrides if not hasattr(defaults, k))
    if unknown:
        raise ValueError(
            f"student preset 'test-vilt' got unknown options {unknown}; allowed: task, answers, num_labels and "
            "ViltConfig fields"
        )
    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
        "max_position_embeddings": 40,
        **overrides,
    }
    config = ViltConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, **settings)
    image_processor = vilt_image_processor(config.image_size, config.patch_size)
    return CrossModalStudent(ViltModel(config), tokenizer, image_processor, task, answers, num_labels)


@STUDENTS.register("vilt")
def vilt(
    tokenizer=None,
    name_or_path: str | None = None,
    task: str = "vqa",
    answers: Sequence[str] | None = None,
    num_labels: int | None = None,
    **unknown: Any,
) -> CrossModalStudent:
    """A ViLT checkpoint (hub id or directory, e.g. ``dandelin/vilt-b32-mlm``) with a new task head, or a saved
    crossmodal student (a directory with ``vldistill.json``). Options: ``task``, ``answers``, ``num_labels``."""
    if unknown:
        raise ValueError(
            f"student preset 'vilt' got unknown options {sorted(unknown)}; allowed: task, answers, num_labels"
        )
    if not name_or_path:
        raise ValueError("student preset 'vilt' needs student.name_or_path (a hub id or a directory)")
    if check_model_source(name_or_path):  # a local directory: weights present, safetensors readable (named if not)
        check_saved_model(name_or_path)
    if (Path(name_or_path) / CONFIG_NAME).is_file():
        student = CrossModalStudent.from_pretrained(name_or_path)
        if student.task != task:
            raise ValueError(f"{name_or_path} holds a {student.task!r} student, not a {task!r} one")
        return student
    return CrossModalStudent.from_vilt(name_or_path, task, answers, num_labels, tokenizer)
