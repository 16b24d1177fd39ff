"""The ``seq2seq`` student kind: an encoder-decoder language model aligned to a CLIP teacher (VLKD).

Dai et al., "Enabling Multimodal Generation on CLIP via Vision-Language Knowledge Distillation", ACL Findings 2022
(arXiv 2203.06386); see ``METHODS.md`` section 3. Any Hugging Face encoder-decoder LM (BART, mBART, T5) gets two
learnable maps into and out of the teacher's space:

- text feature ``p(x) = W_p pool(E(x))``: the encoder ``E`` on the clean text, pooled at the EOS token (option:
  mean over tokens), projected to the teacher's embedding width ``d_T`` (``text_projection``). TTDM and ITCL
  compare ``p(x)`` with the teacher's ``t(x)`` and ``v(I)``.
- image prefix ``W_v v``: the teacher's image output (the L2-normalised pooled embedding ``v`` [B, d_T], mapped to
  ``prefix_tokens`` vectors, or the teacher's patch tokens [B, n, h_T], mapped one to one) projected into the LM's
  input-embedding space (``prefix_projection``) and prepended to the encoder's token embeddings. ICTI trains the
  decoder to reconstruct a caption from the prefix and the span-corrupted caption (:func:`span_corrupt`).

This module holds the model (:class:`Seq2SeqStudent`, its options, saving and loading) and its presets; the inputs
side (span corruption and :class:`Seq2SeqProcessor`, which tokenises samples and fills the prompt template) is in
:mod:`vldistill.students.seq2seq_inputs`, whose public names are re-exported here.

Everything marked [uncertain] in ``METHODS.md`` is an option of :class:`Seq2SeqOptions` with its default there.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from ..models import check_model_source, check_saved_model
from ..outputs import Embeddings, ModelDims
from ..tokenization import train_wordpiece
from .kinds import STUDENT_KINDS, STUDENT_OUTPUTS, StudentKind
from .presets import STUDENTS
from .seq2seq_inputs import Seq2SeqProcessor, mask_token_of, to_device
from .seq2seq_inputs import corruption_generator as corruption_generator  # re-exported
from .seq2seq_inputs import sample_indices as sample_indices  # re-exported
from .seq2seq_inputs import sample_text as sample_text  # re-exported
from .seq2seq_inputs import span_corrupt as span_corrupt  # re-exported

POOLS = ("eos", "mean")
PREFIXES = ("pooled", "tokens")
CONFIG_NAME = "vldistill.json"
PROJECTIONS_NAME = "projections.safetensors"
LM_DIR = "lm"


# ------------------------------------------------------------------------------------------------- options
@dataclass
class Seq2SeqOptions:
    """Settings of a seq2seq student (saved in its ``vldistill.json``).

    Attributes:
        pool: how the encoder states of a text become one vector before ``W_p``: ``eos`` (the state at the last
            EOS token, else the last non-padding token) or ``mean`` (over non-padding tokens) [uncertain].
        prefix: what the image prefix is built from: ``pooled`` (the teacher's pooled image embedding ``[B, d_T]``,
            L2-normalised when ``normalize_image``, mapped to ``prefix_tokens`` LM input vectors) or ``tokens`` (the
            teacher's image tokens ``[B, n, h_T]``, each mapped to one LM input vector) [uncertain].
        prefix_tokens: number of LM input vectors a pooled image embedding becomes (``prefix: pooled`` only).
        normalize_image: L2-normalise the teacher's pooled image embedding before ``W_v`` (``v`` in the paper).
        template: the encoder input of a VQA sample; ``{question}`` is the question, ``{mask}`` the tokenizer's
            mask token [uncertain template].
        mask_ratio: fraction of the maskable tokens of a caption that span corruption replaces.
        mean_span: mean of the Poisson distribution of span lengths.
        seed: seeds the span corruption (with the sample index and the epoch).
        max_length: truncation length of every tokenised text; default ``min(tokenizer.model_max_length, 128)``.
        mask_token: the mask token; default the tokenizer's ``mask_token`` (``<extra_id_0>`` for T5 tokenizers).
        lang_code: the language code of a multilingual tokenizer with ``src_lang`` / ``tgt_lang`` (mBART,
            mBART-50: ``zh_CN``, ``en_XX``): every text is tagged with it (its ``src_lang`` and ``tgt_lang``), and
            generation starts the decoder in it (mBART-50, whose tokenizer puts the code first:
            ``forced_bos_token_id``; mBART, which puts it last: ``decoder_start_token_id``). ``None``: the
            tokenizer's own setting (``en_XX`` for mBART-50), which mistags text in another language.
    """

    pool: str = "eos"
    prefix: str = "pooled"
    prefix_tokens: int = 1
    normalize_image: bool = True
    template: str = "Question: {question} Answer: {mask}"
    mask_ratio: float = 0.3
    mean_span: float = 3.0
    seed: int = 0
    max_length: int | None = None
    mask_token: str | None = None
    lang_code: str | None = None

    def __post_init__(self) -> None:
        _choice("pool", self.pool, POOLS)
        _choice("prefix", self.prefix, PREFIXES)
        if isinstance(self.prefix_tokens, bool) or not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens={self.prefix_tokens!r} is not allowed; it must be an int >= 1")
        if not 0 <= self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio={self.mask_ratio!r} is not allowed; it must be in [0, 1]")
        if not self.mean_span > 0:
            raise ValueError(f"mean_span={self.mean_span!r} is not allowed; it must be > 0")
        if "{question}" not in self.template:
            raise ValueError(f"template={self.template!r} is not allowed; it must contain {{question}}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length!r} is not allowed; it must be >= 2 or None")

    @classmethod
    def parse(cls, options: Mapping[str, Any], where: str = "seq2seq student") -> Seq2SeqOptions:
        """Options from a dict; an unknown key is an error that lists the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"{where} got unknown options {unknown}; allowed: {', '.join(allowed)}")
        return cls(**options)


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


# -------------------------------------------------------------------------------------------------- student
@STUDENT_KINDS.register("seq2seq")
class Seq2SeqStudent(StudentKind):
    """An encoder-decoder LM with a text projection ``W_p`` and an image-prefix projection ``W_v`` (VLKD).

    Parameter groups: ``lm`` (the whole LM), ``text_projection`` (``W_p``), ``prefix`` (``W_v``).

    Args:
        model: a Hugging Face ``*ForConditionalGeneration`` encoder-decoder LM.
        tokenizer: its tokenizer.
        teacher_width: the teacher's embedding width ``d_T`` (output of ``W_p``; input of ``W_v`` for ``pooled``).
        teacher_image_width: the width of the teacher's image tokens (input of ``W_v`` for ``prefix: tokens``).
        options: :class:`Seq2SeqOptions` or a dict of them.
    """

    kind = "seq2seq"
    provides = frozenset({"text", "text_feature", "lm_loss"})

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        teacher_width: int,
        teacher_image_width: int,
        options: Seq2SeqOptions | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"a seq2seq student needs an encoder-decoder LM; got a {model.config.model_type!r} model")
        self.model = model
        self.tokenizer = tokenizer
        self.options = options if isinstance(options, Seq2SeqOptions) else Seq2SeqOptions.parse(options or {})
        if self.options.lang_code is not None:
            set_lang_code(tokenizer, self.options.lang_code)
        self.teacher_width = int(teacher_width)
        self.teacher_image_width = int(teacher_image_width)
        hidden = self.hidden_size
        self.text_projection = nn.Linear(hidden, self.teacher_width, bias=False)
        pooled = self.options.prefix == "pooled"
        prefix_in = self.teacher_width if pooled else self.teacher_image_width
        self.prefix_projection = nn.Linear(prefix_in, hidden * (self.options.prefix_tokens if pooled else 1))

    # ----------------------------------------------------------------------------------------- properties
    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def dims(self) -> ModelDims:
        """``embed = d_T`` (``p(x)``); image and text widths: the LM's (its prefix vectors and its tokens)."""
        return ModelDims(embed=self.teacher_width, image_width=self.hidden_size, text_width=self.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, tuple[str, ...]]:
        return {"lm": ("model.",), "text_projection": ("text_projection.",), "prefix": ("prefix_projection.",)}

    def processor(self, epoch: int = 0) -> Seq2SeqProcessor:
        return Seq2SeqProcessor(self.tokenizer, self.options, epoch)

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self, inputs: Mapping[str, Any], needs: Collection[str], teacher: Embeddings | None = None
    ) -> Embeddings:
        """Text features ``p(x)`` of every text field (``text``, ``text_feature``) and the ICTI loss (``lm_loss``).

        Args:
            inputs: what :class:`Seq2SeqProcessor` returns.
            needs: the outputs to compute (a subset of ``provides``).
            teacher: the teacher's outputs on the same batch: ``image`` (``prefix: pooled``) or ``image_tokens``
                (``prefix: tokens``) builds the image prefix of ``lm_loss``.
        """
        unknown = sorted((set(needs) & STUDENT_OUTPUTS) - self.provides)  # "teacher" etc. are not student outputs
        if unknown:
            raise ValueError(f"a seq2seq student cannot provide {unknown}; it provides {sorted(self.provides)}")
        inputs = to_device(inputs, self.device)
        out = Embeddings()
        if {"text", "text_feature"} & set(needs):
            out.text = {name: self.text_feature(**enc) for name, enc in inputs["text"].items()}
            out.extra["text_feature"] = next(iter(out.text.values()))
        if "lm_loss" in needs:
            out.extra["lm_loss"] = self.lm_loss(self.image_prefix(teacher), **inputs["lm"])
        return out

    def text_feature(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``p(x) = W_p pool(E(x))`` ``[B, d_T]`` of clean text (no image prefix)."""
        states = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(pool_states(states, input_ids, attention_mask, self.options.pool, self._eos_id()))

    def image_prefix(self, teacher: Embeddings | Tensor | None) -> Tensor:
        """``W_v v``: the teacher's image output as LM input vectors ``[B, P, h]``.

        Raises:
            ValueError: no teacher image output, or one whose width does not fit ``W_v``.
        """
        pooled = self.options.prefix == "pooled"
        image = teacher
        if isinstance(teacher, Embeddings):
            image = teacher.image if pooled else teacher.image_tokens
        what = "pooled image embedding [B, d_T]" if pooled else "image tokens [B, n, h_T]"
        if image is None:
            hint = "" if pooled else " (a recipe asks for them with the icti loss's option prefix: tokens)"
            raise ValueError(f"lm_loss needs the teacher's {what} for the image prefix; the teacher gave none{hint}")
        expected = self.prefix_projection.in_features
        if image.dim() != (2 if pooled else 3) or image.shape[-1] != expected:
            raise ValueError(
                f"the image prefix projection expects the teacher's {what} of width {expected}; "
                f"got a tensor of shape {tuple(image.shape)} (width {image.shape[-1]})"
            )
        image = image.to(self.device, self.prefix_projection.weight.dtype)
        if pooled:
            if self.options.normalize_image:
                image = nn.functional.normalize(image, dim=-1)
            return self.prefix_projection(image).view(image.shape[0], self.options.prefix_tokens, self.hidden_size)
        return self.prefix_projection(image)

    def lm_loss(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Mean token cross-entropy of the decoder reconstructing ``labels`` from ``[prefix; tokens]`` (ICTI)."""
        embeds, mask = self._with_prefix(prefix, input_ids, attention_mask)
        return self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    def _with_prefix(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``inputs_embeds = cat([prefix, embed(ids)], 1)``: beside the embedding module's output, which already
        carries BART's ``sqrt(d)`` scaling, so the prefix is not scaled a second time."""
        if prefix.shape[0] != input_ids.shape[0]:
            raise ValueError(f"image prefix batch {prefix.shape[0]} does not match text batch {input_ids.shape[0]}")
        tokens = self.model.get_input_embeddings()(input_ids)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and prefix.shape[1] + tokens.shape[1] > limit:
            raise ValueError(
                f"{prefix.shape[1]} prefix vectors + {tokens.shape[1]} tokens exceed the LM's {limit} positions"
            )
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        return torch.cat([prefix.to(tokens.dtype), tokens], dim=1), mask

    def _eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.sep_token_id

    # ---------------------------------------------------------------------------------------- generation
    def format_prompt(self, question: str, template: str | None = None) -> str:
        """``template`` (default the student's) with the question and the tokenizer's mask token filled in."""
        return (template or self.options.template).format(question=question, mask=mask_token_of(self.tokenizer))

    @torch.no_grad()
    def generate(
        self,
        teacher_image: Tensor,
        prompts: Sequence[str],
        max_new_tokens: int = 20,
        num_beams: int = 1,
        **settings: Any,
    ) -> list[str]:
        """Generate from the image prefix and a prompt per image (greedy; beam search with ``num_beams > 1``).

        Args:
            teacher_image: the teacher's pooled image embeddings ``[B, d_T]`` (``prefix: tokens``: its image tokens).
            prompts: ``B`` encoder prompts, e.g. :meth:`format_prompt` of a question.
            max_new_tokens: the longest output.
            num_beams: beams of beam search; 1 is greedy decoding.
            **settings: other ``generate`` settings, e.g. ``no_repeat_ngram_size`` (given explicitly, they override
                the defaults a checkpoint's own generation config carries).

        Returns:
            ``B`` decoded strings without special tokens.
        """
        if len(prompts) != teacher_image.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {teacher_image.shape[0]} images")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} is empty or not a string: {prompt!r}")
        enc = to_device(self.processor().encode(list(prompts)), self.device)
        if self.options.lang_code is not None:
            settings = {**lang_code_start(self.tokenizer, self.options.lang_code), **settings}
        was_training = self.training
        self.eval()
        try:
            embeds, mask = self._with_prefix(self.image_prefix(teacher_image), enc["input_ids"], enc["attention_mask"])
            ids = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                **settings,
            )
        finally:
            self.train(was_training)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # --------------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``lm/`` (the LM and its tokenizer: ``AutoModelForSeq2SeqLM`` loads it alone), ``projections.safetensors``
        (``W_p``, ``W_v``) and ``vldistill.json`` (kind, options, widths)."""
        directory = Path(directory)
        (directory / LM_DIR).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / LM_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(directory / LM_DIR)
        tensors = {f"text_projection.{k}": v for k, v in self.text_projection.state_dict().items()}
        tensors |= {f"prefix_projection.{k}": v for k, v in self.prefix_projection.state_dict().items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / PROJECTIONS_NAME)
        config = {
            "kind": self.kind,
            "lm": LM_DIR,
            "projections": PROJECTIONS_NAME,
            "teacher_width": self.teacher_width,
            "teacher_image_width": self.teacher_image_width,
            "lm_hidden_size": self.hidden_size,
            "options": asdict(self.options),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Seq2SeqStudent:
        """Load what :meth:`save_pretrained` wrote."""
        directory = Path(directory)
        config = read_config(directory, cls.kind)
        lm = directory / config.get("lm", LM_DIR)
        student = cls(
            AutoModelForSeq2SeqLM.from_pretrained(lm),
            AutoTokenizer.from_pretrained(lm),
            config["teacher_width"],
            config["teacher_image_width"],
            Seq2SeqOptions.parse(config.get("options", {})),
        )
        tensors = load_file(directory / config.get("projections", PROJECTIONS_NAME))
        for name in ("text_projection", "prefix_projection"):
            state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            getattr(student, name).load_state_dict(state)
        return student

    @classmethod
    def from_lm(
        cls,
        name_or_path_or_model: str | os.PathLike | PreTrainedModel,
        tokenizer,
        teacher_width: int,
        teacher_image_width: int,
        **options: Any,
    ) -> Seq2SeqStudent:
        """A student on any encoder-decoder LM: a loaded model, a hub id or a directory (tokenizer from there too).

        Args:
            name_or_path_or_model: the LM.
            tokenizer: a tokenizer, a hub id or directory; ``None``: the LM's own (needs a path).
            teacher_width: ``d_T``.
            teacher_image_width: the teacher's image-token width.
            **options: :class:`Seq2SeqOptions` fields.
        """
        model = name_or_path_or_model
        if not isinstance(model, PreTrainedModel):
            model = AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path_or_model))
        if tokenizer is None and isinstance(name_or_path_or_model, PreTrainedModel):
            raise ValueError("from_lm with a loaded model needs its tokenizer")
        if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or name_or_path_or_model))
        return cls(model, tokenizer, teacher_width, teacher_image_width, Seq2SeqOptions.parse(options))


def set_lang_code(tokenizer, code: str) -> None:
    """Tag every text the tokenizer encodes with language ``code`` (an mBART-style tokenizer's ``src_lang`` and
    ``tgt_lang``).

    Raises:
        ValueError: a tokenizer without language codes, or a code that is not one of its tokens.
    """
    if not hasattr(tokenizer, "src_lang"):
        raise ValueError(
            f"lang_code={code!r}: the tokenizer ({type(tokenizer).__name__}) has no language codes (src_lang); "
            "lang_code is for multilingual tokenizers such as mBART's; leave it unset"
        )
    known = getattr(tokenizer, "lang_code_to_id", None) or {}
    if (known and code not in known) or tokenizer.convert_tokens_to_ids(code) == tokenizer.unk_token_id:
        near = sorted(c for c in known if c.split("_")[0] == code.split("_")[0])  # zh_XX: zh_CN
        sample = ", ".join(near or sorted(known)[:8]) + (", ..." if len(known) > len(near or sorted(known)[:8]) else "")
        raise ValueError(
            f"lang_code={code!r} is not a language code of the tokenizer ({len(known)} codes: {sample or 'none'})"
        )
    tokenizer.src_lang = code
    tokenizer.tgt_lang = code


def lang_code_start(tokenizer, code: str) -> dict[str, int]:
    """The ``generate`` setting that starts the decoder in language ``code``: ``forced_bos_token_id`` when the
    tokenizer puts the code before the text (mBART-50: the decoder starts from EOS, then the code), else
    ``decoder_start_token_id`` (mBART: ``text EOS code``, and the decoder starts from the code)."""
    code_id = tokenizer.convert_tokens_to_ids(code)
    ids = tokenizer("x")["input_ids"]
    return {"forced_bos_token_id": code_id} if ids and ids[0] == code_id else {"decoder_start_token_id": code_id}


def read_config(directory: Path, kind: str) -> dict[str, Any]:
    """The ``vldistill.json`` of a saved student, checked to be of ``kind``."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a saved vldistill {kind} student")
    config = json.loads(path.read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{path} describes a {config.get('kind')!r} student, not a {kind!r} one")
    return config


def pool_states(states: Tensor, input_ids: Tensor, attention_mask: Tensor, pool: str, eos_id: int | None) -> Tensor:
    """One vector per text: the state at the last EOS token (else the last non-padding token), or the masked mean."""
    mask = attention_mask.to(states.dtype)
    if pool == "mean":
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    positions = torch.arange(states.shape[1], device=states.device)
    last = (attention_mask.bool() * positions).argmax(1)
    if eos_id is not None:
        is_eos = (input_ids == eos_id) & attention_mask.bool()
        last = torch.where(is_eos.any(1), (is_eos * positions).argmax(1), last)
    return states[torch.arange(states.shape[0], device=states.device), last]


# -------------------------------------------------------------------------------------------------- presets
#: Text a fallback tokenizer of the ``test-*`` presets is trained on: every lower-case letter, digit and sign.
TINY_CORPUS = [" ".join(string.ascii_lowercase + string.digits + string.punctuation), "a the what is of picture"]


def tiny_tokenizer():
    """A tiny WordPiece tokenizer (any lower-case ASCII text splits into known pieces) for ``test-*`` presets."""
    return train_wordpiece(TINY_CORPUS, vocab_size=200, max_length=32)


def tokenizer_or_tiny(tokenizer):
    if tokenizer is None:
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer


def _teacher_widths(teacher, options: dict[str, Any], preset: str) -> tuple[int, int]:
    """``(d_T, h_T)`` from the teacher's dims, or from ``teacher_width`` / ``teacher_image_width`` options."""
    given = options.pop("teacher_width", None), options.pop("teacher_image_width", None)
    if teacher is not None:
        widths = teacher.dims.embed, teacher.dims.image_width
        if any(g is not None and g != w for g, w in zip(given, widths, strict=True)):
            raise ValueError(f"student preset {preset!r}: teacher widths {given} disagree with the teacher's {widths}")
        return widths
    if None in given:
        raise ValueError(
            f"student preset {preset!r} needs the teacher's widths: a teacher (teacher:), "
            "or both teacher_width and teacher_image_width"
        )
    return int(given[0]), int(given[1])


def _split_config(options: dict[str, Any], config_cls, preset: str) -> tuple[dict, dict]:
    """Student options (:class:`Seq2SeqOptions` fields) and LM config overrides (fields of ``config_cls``)."""
    student_keys = {f.name for f in fields(Seq2SeqOptions)}
    student = {k: v for k, v in options.items() if k in student_keys}
    config = {k: v for k, v in options.items() if k not in student_keys}
    defaults = config_cls()
    unknown = sorted(k for k in config if not hasattr(defaults, k))
    if unknown:
        raise ValueError(
            f"student preset {preset!r} got unknown options {unknown}; allowed: {', '.join(sorted(student_keys))}, "
            f"teacher_width, teacher_image_width, and {config_cls.__name__} fields"
        )
    return student, config


def _special_ids(tokenizer) -> dict[str, int]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos, "bos_token_id": tokenizer.bos_token_id}


@STUDENTS.register("test-bart")
def test_bart(tokenizer=None, teacher=None, **options: Any) -> Seq2SeqStudent:
    """Tiny BART for tests: d_model 32, 2 + 2 layers, 2 heads, FFN 64, 64 positions (random initialisation).

    Options: :class:`Seq2SeqOptions` fields, ``teacher_width`` / ``teacher_image_width`` (without a teacher) and
    any ``BartConfig`` field. Without a tokenizer it trains a tiny one (:func:`tiny_tokenizer`).
    """
    tokenizer = tokenizer_or_tiny(tokenizer)
    widths = _teacher_widths(teacher, options, "test-bart")
    student_options, overrides = _split_config(options, BartConfig, "test-bart")
    ids = _special_ids(tokenizer)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        decoder_start_token_id=ids["eos_token_id"],  # as BART: the decoder starts from EOS
        forced_eos_token_id=ids["eos_token_id"],
        **{**ids, **overrides},
    )
    return Seq2SeqStudent(BartForConditionalGeneration(config), tokenizer, *widths, student_options)


@STUDENTS.register("test-t5")
def test_t5(tokenizer=None, teacher=None, **options: Any) -> Seq2SeqStudent:
    """Tiny T5 for tests: d_model 32, 2 + 2 layers, 2 heads of 16, FFN 64 (random initialisation).

    Options as :func:`test_bart`, with ``T5Config`` fields.
    """
    tokenizer = tokenizer_or_tiny(tokenizer)
    widths = _teacher_widths(teacher, options, "test-t5")
    student_options, overrides = _split_config(options, T5Config, "test-t5")
    ids = _special_ids(tokenizer)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=ids["pad_token_id"],  # as T5: the decoder starts from padding
        **{**{k: v for k, v in ids.items() if k != "bos_token_id"}, **overrides},
    )
    return Seq2SeqStudent(T5ForConditionalGeneration(config), tokenizer, *widths, student_options)


@STUDENTS.register("seq2seq")
def seq2seq(tokenizer=None, teacher=None, name_or_path: str | None = None, **options: Any) -> Seq2SeqStudent:
    """A pretrained encoder-decoder LM (hub id or directory: ``facebook/bart-base``, ``t5-small``, ...) or a saved
    seq2seq student (a directory with ``vldistill.json``), aligned to the recipe's teacher.

    Options: :class:`Seq2SeqOptions` fields, and ``teacher_width`` / ``teacher_image_width`` without a teacher.
    """
    if not name_or_path:
        raise ValueError("student preset 'seq2seq' needs student.name_or_path (a hub id or a directory)")
    if check_model_source(name_or_path):  # a local directory: weights present, safetensors readable (named if not)
        check_saved_model(name_or_path)
    if (Path(name_or_path) / CONFIG_NAME).is_file():
        if options or tokenizer is not None:
            raise ValueError("student preset 'seq2seq' loads a saved student as it was saved; it takes no options")
        student = Seq2SeqStudent.from_pretrained(name_or_path)
        if teacher is not None:
            saved, widths = (student.teacher_width, student.teacher_image_width), teacher.dims
            if saved != (widths.embed, widths.image_width):
                raise ValueError(f"{name_or_path} was aligned to teacher widths {saved}; this teacher has {widths}")
        return student
    widths = _teacher_widths(teacher, options, "seq2seq")
    return Seq2SeqStudent.from_lm(name_or_path, tokenizer, *widths, **options)
