"""Typed run configuration: recipe YAML + command-line overrides -> validated dataclasses.

A recipe is one YAML file (one experiment). Overrides use dotted keys, e.g. ``--train.lr 1e-4`` or
``--stages.0.steps 50``; values are parsed as YAML. An unknown key or a bad value fails with a
:class:`ConfigError` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .registry import Registry


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


# ----------------------------------------------------------------------------------------------------- schema
@dataclass
class TeacherConfig:
    """One frozen teacher."""

    name_or_path: str | None = None
    """Hub id or local directory of a CLIP-family model. The quickstart fills in its reference teacher."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Caption languages the teacher's text tower understands; other languages are distilled cross-lingually."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you ask for it."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype the teacher runs in."""
    source: Literal["live", "cache"] = "live"
    """Where teacher outputs come from: ``live`` runs the teacher on every batch; ``cache`` reads them from the
    teacher-output cache in ``cache`` (``vldistill cache`` builds it), checked against this teacher, the data and
    the ``cache:`` settings."""
    cache: str | None = None
    """Directory of the teacher-output cache (with ``source: cache``; ``vldistill cache`` writes it). Several
    teachers share one cache directory (one set of columns each)."""

    def __post_init__(self):
        if self.source == "cache" and not self.cache:
            raise ConfigError("cache = None: give the cache directory when source is 'cache'")


@dataclass
class StudentConfig:
    """The student to train."""

    preset: str = "clip-tiny"
    """A registered student preset (``vldistill info`` lists them)."""
    tokenizer: str | None = None
    """Hub id or directory of the student's tokenizer; ``null`` trains a WordPiece tokenizer on the training
    captions (all languages), the evaluation class names and templates."""
    vocab_size: int = 2000
    """Vocabulary size when a tokenizer is trained."""
    name_or_path: str | None = None
    """For preset ``pretrained``: the dual encoder to start from."""
    vision: str | None = None
    """For preset ``vtde``: the pretrained vision model."""
    text: str | None = None
    """For preset ``vtde``: the pretrained text model."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Preset size overrides, e.g. ``{vision.num_hidden_layers: 3, projection_dim: 128}``."""

    def __post_init__(self):
        if self.vocab_size < 16:
            raise ConfigError(f"vocab_size = {self.vocab_size}: must be at least 16")


DOMAIN_SHIFTS = ("combos", "phrasings")


@dataclass(frozen=True)
class SplitConfig:
    """The training regime: the full data, a low-shot fraction, a domain shift, or a domain shift and low-shot."""

    low_shot: float | None = None
    """Fraction of the training items to keep, in (0, 1]; ``null`` keeps all."""
    domain_shift: str | None = None
    """``combos`` (held-out attribute combinations of the image), ``phrasings`` (held-out question or hypothesis
    phrasings), or ``null`` for none."""
    hold_out: list[str] = field(default_factory=list)
    """What the domain shift holds out of training and tests on: combinations such as ``red circle`` or phrasing
    patterns such as ``what is the color of the *``; empty: the bundled easy-VQA data's defaults."""
    seed: int = 0
    """Seeds the low-shot draw."""

    def __post_init__(self) -> None:
        low = self.low_shot
        if low is not None and (isinstance(low, bool) or not isinstance(low, int | float) or not 0 < low <= 1):
            raise ConfigError(f"low_shot = {low!r}: must be a number in (0, 1], or null for all training items")
        if self.domain_shift is not None and self.domain_shift not in DOMAIN_SHIFTS:
            raise ConfigError(
                f"domain_shift = {self.domain_shift!r}: must be one of {', '.join(DOMAIN_SHIFTS)}, or null"
            )
        hold_out = self.hold_out
        if isinstance(hold_out, str) or not isinstance(hold_out, list | tuple):
            raise ConfigError(f"hold_out = {hold_out!r}: must be a list of strings")
        if not all(isinstance(value, str) and value.strip() for value in hold_out):
            raise ConfigError(f"hold_out = {hold_out!r}: every entry must be a non-empty string")
        if hold_out and self.domain_shift is None:
            raise ConfigError(f"hold_out = {hold_out!r}: only used with domain_shift ({' or '.join(DOMAIN_SHIFTS)})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed = {self.seed!r}: must be an integer")
        object.__setattr__(self, "hold_out", list(hold_out))


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: str = "bundled:easyvqa"
    """``bundled:easyvqa``, a ``.jsonl``/``.csv`` manifest, ``hf:NAME_OR_PATH`` (a ``datasets`` dataset), or
    webdataset tar shards ``wds:PATH/{00000..00099}.tar`` (streamed in training: ``streaming``)."""
    eval: str | None = "bundled:easyvqa"
    """Evaluation data in the same forms; ``null`` skips evaluation."""
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    """Caption languages to train on; every sample needs a caption in each."""
    train_split: str = "train"
    """Split for ``hf:`` and bundled data."""
    eval_split: str = "test"
    """Split for ``hf:`` and bundled evaluation data."""
    image_root: str | None = None
    """Directory that relative image paths in a manifest are resolved against (default: the manifest's)."""
    image_root_only: bool = False
    """Refuse (as a bad row: an error, or skipped with ``skip_bad``) any image path that resolves outside the image
    root (``..``, an absolute path, a symbolic link leading out), for manifests written by others. Off: a manifest may
    name any image file the user can read, as its paths say."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for ``hf:`` data, e.g. ``{image: img, caption: text}``."""
    skip_bad: bool = False
    """Skip rows with a missing/corrupt image or an empty caption (and report how many) instead of failing."""
    limit_train: int | None = None
    """Use only this many training samples (deterministic subset)."""
    limit_eval: int | None = None
    """Use only this many evaluation samples."""
    paired: float | None = None
    """How many training samples keep their image-caption pairing: a count (> 1) or a fraction in (0, 1], drawn with
    ``data.split.seed``; ``null``: all. Stages with ``samples: paired`` (the default) train on these only; stages
    with ``samples: all`` also see the other samples' images and captions, as images alone and captions alone (what
    a real user has for free besides a small captioned set). A no-teacher baseline gets the paired samples only."""
    classnames: dict[str, list[str]] = field(default_factory=dict)
    """Zero-shot class names per language for non-bundled evaluation data (labels index into them), e.g.
    ``{en: [cat, dog], zh: [猫, 狗]}``, or the path of a YAML/JSON file holding that mapping."""
    templates: dict[str, list[str]] = field(default_factory=dict)
    """Zero-shot prompt templates per language (each with ``{}``), or the path of a YAML/JSON file holding them;
    default ``a photo of a {}.`` (English), ``一张{}的照片。`` (Chinese)."""
    texts: dict[str, list[str]] = field(default_factory=dict)
    """Texts without images (free texts) per language, which stages with ``texts: N`` add to their micro-batches
    as the text field ``texts.LANG`` (read by a loss with ``lang: texts.en``): a teacher embeds them once before
    training, so a student's text tower may learn from far more text than its captions. Each source is a ``.txt``
    file (one text per line), a ``.jsonl`` file (a ``text`` per line) or ``bundled:easyvqa-questions`` (the distinct
    English questions of easy-vqa's train split), e.g. ``{en: [bundled:easyvqa-questions, more.txt]}``."""
    task: Literal["pairs", "vqa", "entailment", "multiple_choice"] = "pairs"
    """The kind of samples ``train`` and ``eval`` hold: image-text ``pairs`` (zero-shot classification and retrieval),
    ``vqa``, ``entailment`` or ``multiple_choice`` (task data: see the README's "Data formats"). For task data,
    ``languages`` names the text fields a dual-encoder student reads (e.g. ``[qa]``: question + right answer)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """The training regime, the same for every method compared: ``low_shot`` (a seeded fraction of the training
    items), ``domain_shift`` (``combos`` or ``phrasings`` held out of training and tested on), or both."""
    streaming: bool | None = None
    """Read the training data as a stream at constant memory (each process and DataLoader worker its own shards, a
    bounded shuffle buffer, reshuffled every epoch; see ``vldistill.data.streaming``). ``null`` (default): webdataset
    tar shards (``wds:PATTERN``) stream, everything else is read map-style; ``true``: ``hf:`` datasets stream too
    (``load_dataset(..., streaming=True)``); ``false``: tar shards are read by offset (random access; the per-sample
    index of a few shards held at a time). A streamed source takes no ``limit_train``, ``paired`` or
    ``split.low_shot`` (they select samples by index). ``vldistill cache`` reads tar shards by offset, and an ``hf:``
    dataset streamed when this is ``true`` (in order, each shard counted once: the cache stores the counts)."""
    shuffle_buffer: int = 1000
    """Samples each DataLoader worker of a streamed source holds to shuffle within (0: shard order only)."""
    rationales: bool = True
    """Multiple choice: use the items' rationales as VCR does: each item trains as two samples of the one head, Q->A
    (question, candidate answers) and QA->R (question + right answer, candidate rationales), and the evaluation
    reports ``q2a``, ``qa2r`` (given the right answer) and ``q2ar`` (both right). ``false``: the rationales are
    dropped, Q->A only. Training on both needs as many rationales as candidates per item."""

    def __post_init__(self):
        if self.split.domain_shift is not None and self.task == "pairs":
            raise ConfigError(
                f"split.domain_shift = {self.split.domain_shift!r}: holds out task items (VQA, entailment, multiple "
                "choice); set data.task, or use split.low_shot / data.paired for image-text pairs"
            )
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer = {self.shuffle_buffer}: give 0 (no buffer) or a number of samples")
        for lang, sources in self.texts.items():
            if not sources:
                raise ConfigError(f"texts.{lang} = []: give at least one source, or leave the language out")
        p = self.paired
        if p is not None and (isinstance(p, bool) or p <= 0 or (p > 1 and p != int(p))):
            raise ConfigError(f"paired = {p!r}: give a count of samples (> 1), a fraction in (0, 1], or null for all")


@dataclass
class LossConfig:
    """One weighted loss term. In YAML every key besides ``name``, ``weight`` and ``label`` is a loss option."""

    name: str = "clip"
    """A registered loss (``vldistill info`` lists them)."""
    weight: float = 1.0
    """Multiplier of this term in the total loss."""
    label: str | None = None
    """Name of the term in logs (default: the loss name plus its tower/language)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the loss (checked against its signature when the run starts)."""


@dataclass
class StageConfig:
    """A training stage: a number of steps with one objective and one set of trainable towers."""

    name: str = "train"
    """Stage name (logs and checkpoints)."""
    steps: int = 100
    """Optimiser steps in this stage."""
    losses: list[LossConfig] = field(default_factory=lambda: [LossConfig()])
    """The weighted terms of the objective."""
    trainable: list[str] = field(default_factory=lambda: ["image", "text"])
    """Parameter groups of the student that receive gradients in this stage; every other parameter is frozen. The
    groups are the student kind's own: ``image``, ``text``, ``scale`` for a dual encoder, e.g. ``lm``,
    ``text_projection``, ``prefix`` for a seq2seq LM, ``embeddings``, ``encoder``, ``pooler``, ``head`` for a
    cross-modal encoder (a name the student does not have is an error listing the ones it has)."""
    lr: float | None = None
    """Peak learning rate of this stage (default: ``train.lr``)."""
    samples: Literal["paired", "all"] = "paired"
    """Which training samples the stage draws: ``paired``, the samples whose image-caption pairing the run may use
    (``data.paired``); ``all``, every training sample, as images alone and captions alone: only losses that never
    compare an image with a text may then be used (``fd``, ``mfd``, ``xling``), which is checked before training."""
    texts: int = 0
    """Free texts (``data.texts``) of each language added to every micro-batch of a ``samples: all`` stage, each
    language in a seeded order of its own; they form the text fields ``texts.LANG``, which only ``fd`` on the text
    tower reads (``lang: texts.en``). A term that reads such a field is left out (with a notice) when the run has no
    ``data.texts``, so a recipe may declare it and still run on captions alone."""

    def __post_init__(self):
        if self.texts < 0:
            raise ConfigError(f"texts = {self.texts}: give 0 (none) or a number of free texts (stage {self.name!r})")
        if self.texts and self.samples != "all":
            raise ConfigError(
                f"texts = {self.texts}: free texts are unpaired data, for stages with samples: all (stage "
                f"{self.name!r} has samples: {self.samples})"
            )
        if self.steps < 1:
            raise ConfigError(f"steps = {self.steps}: must be at least 1 (stage {self.name!r})")
        if not self.losses:
            raise ConfigError(f"losses = []: give at least one loss (stage {self.name!r})")
        if not self.trainable:
            raise ConfigError(
                f"trainable = []: give at least one parameter group, e.g. image, text (stage {self.name!r})"
            )


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, checkpoints and logging."""

    batch_size: int = 64
    """Samples per micro-batch over all processes: on several processes (``accelerate launch``, ``torchrun``) it is
    split evenly between them (give a multiple of their number), so a recipe trains the same on 1 or N devices.
    An optimiser step takes ``grad_accum`` micro-batches."""
    lr: float = 5e-4
    """Peak learning rate (AdamW), reached after warm-up, then cosine decay to zero at the end of each stage."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms and the logit scale)."""
    warmup_steps: int = 10
    """Linear warm-up steps at the start of each stage."""
    grad_accum: int = 1
    """Gradient accumulation: micro-batches per optimiser step."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Mixed precision through Accelerate (autocast; the weights and the optimiser stay float32). On a GPU with
    bfloat16 (A100, H100, L4 and later) use ``bf16``: matrix products run at the tensor cores' bf16 rate, with no loss
    scaling; ``fp16`` (older GPUs) scales the loss and skips steps whose gradients overflow. ``no`` on a CPU."""
    tf32: bool = True
    """On CUDA, let float32 matrix products and convolutions use TF32 tensor cores (``torch.backends.cuda.matmul
    .allow_tf32`` and ``torch.backends.cudnn.allow_tf32``, set for the process when training starts): what autocast
    leaves in float32 (the losses, ``mixed_precision: no``) runs several times faster, with a 10-bit mantissa in the
    products. ``false`` keeps full float32 products. Ignored on a CPU, whose results it never changes."""
    compile: bool = False
    """Compile the towers of the student and of the live teachers with ``torch.compile`` (in place: parameter
    names, checkpoints and the exported student are unchanged; they are given back uncompiled when ``fit`` ends).
    The first steps are slower while it compiles, and again when a batch's text length or a stage's trainable towers
    change; off by default. ``benchmarks/gpu_speed.py --variants`` measures what it gives on a GPU."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; ``null`` disables clipping."""
    seed: int = 0
    """Seed for initialisation, data order and masking."""
    checkpoint_every: int = 0
    """Also write a checkpoint every N steps (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    log_every: int = 10
    """Log metrics every N steps."""
    output_dir: str = "runs/fit"
    """Where checkpoints, metrics and the exported student go."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Also log to TensorBoard (``OUTPUT_DIR/tb``)."""
    threads: int | None = None
    """CPU threads per process for training (``torch.set_num_threads``); ``null``: torch's default, which is
    ``OMP_NUM_THREADS`` when set, else every core. On a machine shared with another busy process set it to 1 (or
    ``OMP_NUM_THREADS=1``): two processes that each spin on every core can run several times slower. Data-loading
    worker processes: ``VLDISTILL_WORKERS`` (default 0: the small bundled images decode fastest in-process)."""

    def __post_init__(self):
        for key, least in (("batch_size", 1), ("grad_accum", 1), ("log_every", 1), ("keep_checkpoints", 1)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key} = {getattr(self, key)}: must be at least {least}")
        for key in ("warmup_steps", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} = {getattr(self, key)}: must be at least 0")
        if self.lr <= 0:
            raise ConfigError(f"lr = {self.lr}: must be positive")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads = {self.threads}: must be at least 1 (or null for torch's default)")


@dataclass
class CacheConfig:
    """How ``vldistill cache`` builds a teacher-output cache, and what a run from it expects (``teacher.source:
    cache`` refuses a cache built with another dtype or augmentation)."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the cached outputs; float32 reproduces the live teacher's losses."""
    tokens: bool = False
    """Also store token features (turned on by itself when a loss of the recipe needs them)."""
    views: int = 1
    """Augmented views per image: 1 caches the image as it is; K > 1 caches K random resized crops and flips, stores
    their parameters, and training replays the same view on the student's image."""
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """Range of the area fraction a view's crop keeps (views > 1)."""
    flip: bool = True
    """Flip half of the views horizontally (views > 1)."""
    seed: int = 0
    """Seed of the views' parameters."""
    batch_size: int = 256
    """Samples per teacher forward while building."""
    workers: int = 2
    """DataLoader worker processes that load and preprocess while the teacher computes (0: in-process)."""
    shard_rows: int | None = None
    """Rows per shard file; ``null``: about 256 MB per shard."""

    def __post_init__(self):
        if self.views < 1:
            raise ConfigError(f"views = {self.views}: must be at least 1")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale = {self.crop_scale}: expected [low, high] with 0 < low <= high <= 1")
        for key, least in (("batch_size", 1), ("workers", 0)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key} = {getattr(self, key)}: must be at least {least}")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise ConfigError(f"shard_rows = {self.shard_rows}: must be at least 1 (or null)")


@dataclass
class GenerationConfig:
    """How a seq2seq student answers and captions by generation (VLKD's zero-shot evaluation); every setting is
    printed and saved with the results. Templates are [uncertain] in ``METHODS.md``: these are its defaults."""

    vqa_template: str = "Question: {question} Answer: {mask}"
    """The encoder prompt of a VQA question, after the image prefix; ``{mask}`` is the LM's mask token."""
    caption_template: str = "A picture of {mask}"
    """The encoder prompt of a caption, after the image prefix."""
    num_beams: int = 1
    """1: greedy decoding; more: beam search with that many beams."""
    max_new_tokens: int = 32
    """The longest generated text (a BART-style LM writes the whole prompt back with the mask filled in)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating n-grams of this size; 0: off. Given explicitly, so that a checkpoint's own generation
    defaults (``facebook/bart-base`` ships ``no_repeat_ngram_size: 3``) never apply unseen."""
    batch_size: int = 64
    """Images per generation call."""

    def __post_init__(self):
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size = {self.no_repeat_ngram_size}: must be at least 0 (0: off)")
        for key, least in (("num_beams", 1), ("max_new_tokens", 1), ("batch_size", 1)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key} = {getattr(self, key)}: must be at least {least}")
        for key in ("vqa_template", "caption_template"):
            if getattr(self, key).count("{mask}") != 1:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: must contain {{mask}} once")
        if "{question}" not in self.vqa_template:
            raise ConfigError(f"vqa_template = {self.vqa_template!r}: must contain {{question}}")


@dataclass
class EvalConfig:
    """What to evaluate after training."""

    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    """Languages for zero-shot classification and retrieval."""
    batch_size: int = 128
    """Evaluation batch size."""
    vqa: str | None = None
    """Seq2seq students (VLKD): VQA data answered zero-shot by generation (``bundled:easyvqa-vqa``, a ``.jsonl``
    manifest, ``hf:NAME``; split ``data.eval_split``, at most ``data.limit_eval`` questions); ``null``: none. The
    captions of ``data.eval`` are always generated and scored (BLEU-4, CIDEr-D)."""
    text_skill: bool = True
    """Seq2seq students: also score the LM on text alone (denoising the evaluation captions, no image) before and
    after training, side by side."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Seq2seq students: prompts and decoding of the zero-shot VQA and captioning."""


@dataclass
class AdaptConfig:
    """MAD's first stage: the teacher fine-tuned on the task's training split before it is distilled
    (``vldistill.train.mad``). The teacher trains as a dual-encoder student (``clip`` loss) on (image, query + right
    answer) pairs: VQA ``qa``, entailment the entailed hypotheses only, multiple choice question + right candidate."""

    steps: int = 100
    """Optimiser steps of the adaptation."""
    batch_size: int = 64
    """Pairs per step (in-batch negatives of the contrastive loss)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW, warm-up then cosine); real CLIP checkpoints want about 1e-5."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    trainable: list[str] = field(default_factory=lambda: ["image", "text"])
    """The teacher's parameter groups that adapt (``image``, ``text``, ``scale``)."""
    output_dir: str | None = None
    """Where the adapted teacher is saved as a Hugging Face model; default ``TRAIN.OUTPUT_DIR/adapted-teacher``."""

    def __post_init__(self):
        for key, least in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key} = {getattr(self, key)}: must be at least {least}")
        if self.lr <= 0:
            raise ConfigError(f"lr = {self.lr}: must be positive")
        if not self.trainable:
            raise ConfigError("trainable = []: give at least one parameter group of the teacher, e.g. image, text")


@dataclass
class RecipeConfig:
    """One experiment. In YAML, ``teacher:`` (one mapping) is shorthand for a one-element ``teachers:`` list."""

    name: str = "recipe"
    """Name of the experiment."""
    role: Literal["student", "teacher"] = "student"
    """What the run trains: a ``student`` (exported to ``OUTPUT_DIR/student``, scored as ``student``) or a
    ``teacher`` (``OUTPUT_DIR/teacher``; e.g. ``reference-teacher``, a CLIP trained from scratch to distil from)."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """Frozen teachers; empty for training without distillation."""
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tiny: dict[str, Any] = field(default_factory=dict)
    """Overrides (dotted keys) applied by ``--tiny``: a version of the recipe that runs in seconds."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Teacher-output cache settings (building, and what a run with ``teacher.source: cache`` expects)."""
    adapt: AdaptConfig | None = None
    """MAD: adapt the (first) teacher to the task's training split first, then run the stages with the adapted
    teacher; ``null`` (default) distils the teacher as it is."""

    def __post_init__(self):
        if self.adapt is not None and (not self.teachers or self.teachers[0].source == "cache"):
            raise ConfigError(
                "adapt: MAD adapts the recipe's first teacher and distils the adapted one, so it needs a live teacher "
                "(teacher.source: live); a cache holds the unadapted teacher's outputs"
            )
        sources = {t.source for t in self.teachers}
        if len(sources) > 1:
            k = next(i for i, t in enumerate(self.teachers) if t.source != self.teachers[0].source)
            raise ConfigError(
                f"teachers.{k}.source = {self.teachers[k].source!r}: all teachers of a recipe come from one source "
                f"(teachers.0.source is {self.teachers[0].source!r})"
            )
        caches = {t.cache for t in self.teachers if t.source == "cache"}
        if len(caches) > 1:
            raise ConfigError(f"teachers.N.cache = {sorted(caches)}: all teachers share one cache directory")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)


# ------------------------------------------------------------------------------------------ dict -> dataclass
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (ints to floats, nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        real = [a for a in args if a is not type(None)]
        if len(real) == 1 and dataclasses.is_dataclass(real[0]):  # an optional section: its own error names the key
            raise ConfigError(errors[0])
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(str(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key} = {value!r}: allowed values: {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        _, val_tp = typing.get_args(tp)
        return {k: _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and values of the wrong type."""
    where = key or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} = {data!r}: expected a mapping with keys {', '.join(_field_names(cls))}")
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {_join(key, unknown[0])!r}; allowed keys{' of ' + key if key else ''}: {', '.join(names)}"
        )
    kwargs = {k: _convert(v, hints[k], _join(key, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a check in __post_init__: its message starts with the field name
        raise ConfigError(_join(key, str(err))) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (for saving the resolved config next to a run)."""
    return dataclasses.asdict(obj)


def non_default(obj: Any) -> Any:
    """The fields of a dataclass (recursively, lists too) whose values differ from their defaults, as a plain dict.

    What a key of a trained artefact (the reference teacher, the reference LM) hashes: a field added to vldistill
    later, with a default that keeps the old behaviour, then leaves the key, and so the cached artefact, unchanged;
    :func:`to_dict` of the whole config would change with every new field and retrain for nothing."""
    if isinstance(obj, list | tuple):
        return [non_default(x) for x in obj]
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested = non_default(value)
            if nested or default is dataclasses.MISSING or type(value) is not type(default):
                out[f.name] = nested
        elif value != default:
            out[f.name] = non_default(value)
    return out


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# ----------------------------------------------------------------------------------------- YAML and overrides
class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a number: PyYAML follows YAML 1.1, where a float needs a dot
    (``1.0e-4``) and ``1e-4`` is a string; YAML 1.2 and every user writing ``--train.lr 1e-4`` mean the number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _load_yaml(stream: Any, where: str | None = None) -> Any:
    """Parse YAML (safely: a SafeLoader subclass builds no arbitrary objects). A syntax error, a character YAML does
    not allow or bytes that are not UTF-8 become one :class:`ConfigError` line naming ``where`` (default: the file),
    the line and the column."""
    where = where or getattr(stream, "name", None) or "YAML"
    try:
        return yaml.load(stream, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = err.context or ""
        if err.context and err.context_mark is not None and err.problem:
            context = f"{err.context} that starts at line {err.context_mark.line + 1}"
        problem = "; ".join(p for p in (err.problem, context) if p)
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None
    except yaml.reader.ReaderError as err:
        raise ConfigError(
            f"{where}: not YAML text: character #x{err.character:04x} at byte {err.position} ({err.reason}; a recipe "
            f"is a YAML text file)"
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where}: not YAML text: byte 0x{err.object[err.start]:02x} at offset {err.start} is not UTF-8 (a recipe "
            f"is a YAML text file)"
        ) from None


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """YAML conveniences: ``teacher:`` shorthand, and loss options written inline next to ``name``/``weight``."""
    raw = copy.deepcopy(raw)
    if "teacher" in raw:
        if "teachers" in raw:
            raise ConfigError("give either 'teacher' or 'teachers', not both")
        teacher = raw.pop("teacher")
        raw["teachers"] = [] if teacher is None else [teacher]
    stages = raw.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else []):  # a non-list fails with its type later
        if not isinstance(stage, dict):
            raise ConfigError(f"stages.{i} = {stage!r}: expected a mapping")
        losses = stage.get("losses")
        if isinstance(losses, list):
            stage["losses"] = [_split_loss(term, f"stages.{i}.losses.{j}") for j, term in enumerate(losses)]
    data = raw.get("data")
    for key in ("classnames", "templates"):
        if isinstance(data, dict) and isinstance(data.get(key), str):  # the path of a YAML/JSON file holding it
            data[key] = _per_language_file(f"data.{key}", data[key])
    return raw


def _per_language_file(key: str, path: str) -> Any:
    """``data.classnames`` / ``data.templates`` given as a file: a YAML (or JSON) mapping language -> list."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key} = {path!r}: expected a mapping of language -> list, or the path of a YAML file")
    with open(file, encoding="utf-8") as f:
        value = _load_yaml(f)
    if not isinstance(value, dict):
        raise ConfigError(f"{key} = {path!r}: the file must hold a mapping of language -> list, e.g. {{en: [a, b]}}")
    return value


def _split_loss(term: Any, key: str) -> dict[str, Any]:
    if isinstance(term, str):
        return {"name": term}
    if not isinstance(term, dict) or "name" not in term:
        raise ConfigError(f"{key} = {term!r}: expected a mapping with at least 'name' (and weight, options)")
    fixed = {k: term[k] for k in ("name", "weight", "label") if k in term}
    options = dict(term.get("options") or {})
    options.update({k: v for k, v in term.items() if k not in ("name", "weight", "label", "options")})
    return {**fixed, "options": options}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-4", "--stages.0.steps=5"]`` -> ``{"train.lr": 1e-4, "stages.0.steps": 5}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"override {arg!r}: expected --key value or --key=value (e.g. --train.lr 1e-4)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, text = arg[2:], args[i + 1]
            i += 2
        out[key] = _load_yaml(text, f"override --{key} {text!r}")
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a raw (normalised) recipe dict; integer segments index lists."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] == "teacher":  # the YAML shorthand also works on the command line
            parts = ["teachers", "0", *parts[1:]]
            raw.setdefault("teachers", [])
            if not raw["teachers"]:
                raw["teachers"].append({})
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = _list_item(node, part, dotted)
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict | list):
                    raise ConfigError(f"override {dotted!r}: {here} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            index = _index(node, last, dotted)
            node[index] = value
        else:
            node[last] = value
    return raw


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _list_item(node: list, part: str, key: str) -> Any:
    return node[_index(node, part, key)]


RECIPES = Registry("recipe")
RECIPE_DIR = Path(__file__).parent / "recipes"
"""The package's recipes: in a source checkout a link to the top-level ``recipes/``, in a wheel a copy of it. In a
checkout made without symbolic links (``git -c core.symlinks=false``) the link is a plain file: then the checkout's
top-level ``recipes/``."""
if not RECIPE_DIR.is_dir():
    RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


def _register_recipe_files() -> None:
    """Every ``recipes/*.yaml`` is a named recipe (``vldistill fit dcclip``), from a checkout or an installed wheel."""
    if RECIPE_DIR.is_dir():
        for path in sorted(RECIPE_DIR.glob("*.yaml")):
            RECIPES.register(path.stem)(path)


_register_recipe_files()


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a registered recipe."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        return path
    if str(name_or_path) not in RECIPES.names() and (path.exists() or path.suffix):
        what = "a directory" if path.is_dir() else f"a {path.suffix!r} file" if path.suffix else "a file"
        what = what if path.exists() else "no such file"
        raise ConfigError(
            f"recipe {str(name_or_path)!r}: expected a YAML file ending in .yaml or .yml, or a registered recipe name "
            f"(vldistill info lists them); got {what}"
        )
    if not RECIPES.names():
        raise ConfigError(
            f"unknown recipe {str(name_or_path)!r}: no recipes were found in {RECIPE_DIR} (is vldistill "
            "installed from a complete checkout or wheel?); give the path of a recipe YAML file"
        )
    try:
        return RECIPES.get(str(name_or_path))
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None


def load_recipe(
    name_or_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    tiny: bool = False,
    raw: dict[str, Any] | None = None,
) -> RecipeConfig:
    """Load a recipe (file, registered name, or raw dict), apply ``tiny`` and user overrides, and validate.

    The tiny overrides come first, so the user's own overrides win.
    """
    if raw is None:
        path = resolve_recipe_path(name_or_path)
        with open(path, encoding="utf-8") as f:
            raw = _load_yaml(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    # Normalised again after each set of overrides, so that overrides may use the YAML conveniences too, e.g.
    # ``--stages.0.losses.0.tower text`` (an inline loss option) or ``--stages.1.losses [clip]``.
    raw = _normalise(raw)
    if tiny:
        raw = _normalise(apply_overrides(raw, raw.get("tiny") or {}))
    raw = _normalise(apply_overrides(raw, overrides or {}))
    return from_dict(RecipeConfig, raw)
