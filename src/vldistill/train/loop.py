"""The training program: recipes run on Hugging Face Accelerate.

One process here; the same code runs unchanged under ``accelerate launch`` or ``torchrun`` on several processes.
``train.batch_size`` is the global batch: every batch is split evenly over the processes, each process encodes its
shard, and :class:`DistillModule` gathers the pooled embeddings of all shards (gradients flow back to each) before
the losses, so in-batch losses (``clip``, ``crd``, ``icl``, ``soft_ce``) see the whole batch and a run on N
processes takes the same steps as on one (``mfd``'s patch masks are drawn for the whole batch too). Teachers are
placed on each process's device. Only the main process writes logs, checkpoints and exports.

Per stage: a fresh AdamW over the trainable student towers and the loss modules' own parameters (adapters,
logit scales), linear warm-up then cosine decay. Checkpoints are written atomically (to a temporary directory,
then renamed) every ``train.checkpoint_every`` steps and at the end of every stage; ``resume=True`` continues
from the last one and reaches the same weights as an uninterrupted run (data order is a pure function of the
seed, stage and step; the RNG state travels in the checkpoint).

On a GPU (CUDA) the loop also uses what makes a step faster there, and none of it on a CPU, whose results stay
exactly those of the plain loop: the fused AdamW kernel (one launch for every parameter), TF32 for the float32
matrix products that autocast leaves (``train.tf32``, on by default), pinned host memory for the loaded batches and
non-blocking copies to the device. ``train.mixed_precision: bf16`` (autocast through Accelerate) is the setting to
use on a bf16 GPU; ``train.compile: true`` compiles the towers of the student and of the live teachers with
``torch.compile``. ``benchmarks/gpu_speed.py`` measures what each of these gives.

Nothing lost, nothing mixed (:class:`RunDirectory`): a run owns its output directory. A new run refuses a directory
that holds another run's files unless told to replace them (``overwrite``); ``resume`` checks that the directory's
``config.json`` is the run's own resolved config and names the keys that differ; a lock keeps a second process out
(its error names the holder's pid). ``metrics.jsonl`` is rewritten atomically on resume (the rows up to the
checkpoint), then appended to, so no kill loses the history. A non-finite teacher output, loss or gradient stops
the run at once (:class:`NonFiniteError`, naming the teacher or cache shard and the step), before the step's
checkpoint could overwrite the last good one. Old checkpoints are renamed before they are deleted, so a kill while
pruning leaves a ``.del-*`` folder that the next run removes.

The parts: :mod:`.step` (one step: teacher outputs, student, losses; the gather over processes; the non-finite
check), :mod:`.sampling` (which samples each micro-batch holds), :mod:`.rundir` (the run directory). This module
holds the loop itself, the optimiser, the schedule and the checkpoints.

This module sits on top of the library: nothing in ``vldistill`` imports it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, send_to_device
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..batching import Collator, LiveTeachers, TeacherSource, teacher_texts
from ..cache.texts import (
    FreeTextTable,
    free_text_file,
    free_text_table,
    load_free_text_tables,
    save_free_text_tables,
)
from ..config import ConfigError, RecipeConfig, StageConfig
from ..data.splits import paired_indices
from ..data.texts import FIELD_PREFIX, FreeTexts, free_fields_of, load_free_texts
from ..files import disk_errors, write_bytes, write_text
from ..files import save_safetensors as save_file  # atomic, with the umask's mode, a full disk named by file
from ..losses import WeightedLoss, build_stage_loss, check_needs, check_unpaired, stage_needs
from ..models import DualEncoder, Teacher, prepare_teachers
from ..outputs import Dims
from ..students import STUDENT_OUTPUTS, set_trainable
from .rundir import RunDirectory, RunError, _complete_checkpoint, open_run
from .sampling import StageSampler, _Subset, _WithTexts, _WithViews
from .step import DistillModule, NonFiniteError, gather_outputs

# The loop's public names, with those of its parts (``rundir``, ``sampling``, ``step``) that callers reach through it.
__all__ = [
    "DistillModule",
    "FitResult",
    "NonFiniteError",
    "RunDirectory",
    "RunError",
    "StageSampler",
    "Trainer",
    "compile_towers",
    "gather_outputs",
    "make_optimizer",
    "open_run",
    "warmup_cosine",
]


@dataclass
class FitResult:
    student: DualEncoder
    output_dir: Path
    history: list[dict[str, Any]]
    wall_seconds: float


def make_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases, norms and logit scales.

    When every trainable parameter is on a CUDA device (place the module first), the fused kernel updates them all
    in one launch; elsewhere (a CPU) torch's default implementation, so CPU results do not change.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "log_s" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    if params and all(p.device.type == "cuda" for p in params):
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_cosine(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = min(warmup, max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------ the run directory
class Trainer:
    """Runs a recipe's stages on a student with (optionally) teachers.

    Args:
        config: the validated recipe.
        student: the student to train (see :func:`prepare_student`).
        train_data: a dataset whose items are ``{"index", "image", "captions", "label"}``.
        teachers: frozen teachers, or ``None`` when no stage needs one.
        teacher_source: stands in for the live teachers (e.g. a cache); default runs ``teachers``.
    """

    def __init__(
        self,
        config: RecipeConfig,
        student: DualEncoder,
        train_data,
        teachers: Sequence[Teacher] = (),
        teacher_source: TeacherSource | None = None,
        free_texts: tuple[FreeTexts, list[FreeTextTable]] | None = None,
    ):
        self.cfg = config
        self.student = student
        self.data = train_data  # every training sample (stages with ``samples: all``)
        paired = config.data.paired
        if getattr(train_data, "streaming", False):  # read shard by shard: there is no index to select samples by
            chosen = {"data.paired": paired, "data.limit_train": config.data.limit_train}
            chosen["data.split.low_shot"] = config.data.split.low_shot
            for key, value in chosen.items():
                if value is not None:
                    raise ConfigError(
                        f"{key} = {value!r}: the training data ({train_data.source}) is streamed and has no index to "
                        "select samples by; set data.streaming: false to read it map-style"
                    )
        self.paired_data = (
            _Subset(train_data, paired_indices(len(train_data), paired, config.data.split.seed))
            if paired is not None
            else train_data
        )
        self.teachers = list(teachers)
        self.teacher_source = teacher_source or (LiveTeachers(self.teachers) if self.teachers else None)
        self.output_dir = Path(config.train.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        self.accelerator = _accelerator(config.train.mixed_precision)
        self._cuda = self.accelerator.device.type == "cuda"  # pinned batches, non-blocking copies, fused AdamW, TF32
        kind = self.accelerator.distributed_type
        if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
            raise ConfigError(
                f"accelerate is configured for {kind.value}; vldistill trains with data parallelism (DDP) only: "
                "launch with a plain multi-GPU or multi-CPU accelerate config, or with torchrun"
            )
        for teacher in self.teachers:  # frozen, not part of the prepared module: placed here, on this process's device
            teacher.to(self.accelerator.device)
        n_proc = self.accelerator.num_processes
        if config.train.batch_size % n_proc:
            raise ConfigError(
                f"train.batch_size = {config.train.batch_size}: the global batch is split evenly over the {n_proc} "
                f"processes; give a multiple of {n_proc}"
            )
        # a cache (or any source with ``dims``) stands in for teachers that are not loaded
        teacher_dims = tuple(t.dims for t in self.teachers) or tuple(getattr(self.teacher_source, "dims", ()))
        self.dims = Dims(student=student.dims, teachers=teacher_dims)
        missing = [lang for lang in config.data.languages if lang not in getattr(train_data, "languages", [lang])]
        if missing:
            raise ConfigError(f"data.languages: the training data has no captions in {missing}")
        self.free: FreeTexts | None = None  # free texts (data.texts) and each teacher's embeddings of them
        self.free_tables: list[FreeTextTable] = []
        if any(s.texts or free_terms(s) for s in config.stages):
            config = self.cfg = self._setup_free_texts(config)
        # Fail now, not after the earlier stages trained: what each loss needs is declared statically and compared
        # with what the student kind and the teacher source provide.
        check_needs(config.stages, student.provides, student.kind, STUDENT_OUTPUTS)
        check_unpaired(config.stages)
        for i, stage in enumerate(config.stages):
            needs = frozenset().union(*(n for _, n in stage_needs(stage, i)))
            if "teacher" in needs and hasattr(self.teacher_source, "check_needs"):  # e.g. token features
                self.teacher_source.check_needs(needs, f"stages.{i}")
            try:
                set_trainable(student, stage.trainable, f"stages.{i}.trainable")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        with torch.random.fork_rng(devices=[]):  # the options' values (checked by the losses) fail now too
            for i, stage in enumerate(config.stages):
                build_stage_loss(stage, self.dims, i)
        if any(s.texts for s in config.stages):  # last: embedding them may load and run the teachers
            self._embed_free_texts(config, free_texts)

    # ------------------------------------------------------------------------------------------ free texts
    def _setup_free_texts(self, config: RecipeConfig) -> RecipeConfig:
        """Check the stages' use of free texts (each term an ``fd`` on a field of a language ``data.texts`` has and
        every teacher embeds). Without ``data.texts`` the terms that read them are left out, with a notice."""
        if not config.data.texts:
            dropped, stages = [], []
            for i, stage in enumerate(config.stages):
                keep = [t for t in stage.losses if not free_terms_of(t)]
                dropped += [f"stages.{i}.losses.{j} ({t.name} on {free_terms_of(t)})" for j, t in free_terms(stage)]
                if not keep:
                    raise ConfigError(f"stages.{i}: every loss reads free texts (texts.*), but data.texts is empty")
                stages.append(dataclasses.replace(stage, texts=0, losses=keep))
            if dropped:
                self._print(f"no data.texts: left out {', '.join(dropped)}; give free texts to use them")
            return dataclasses.replace(config, stages=stages)
        n_proc = self.accelerator.num_processes
        for i, stage in enumerate(config.stages):
            for j, term in free_terms(stage):
                fields = free_terms_of(term)
                if not stage.texts:
                    raise ConfigError(
                        f"stages.{i}.losses.{j} ({term.name}) reads {fields}, but stages.{i}.texts is 0: set how many "
                        "free texts each micro-batch holds"
                    )
                unknown = [f for f in fields if f.removeprefix(FIELD_PREFIX) not in config.data.texts]
                if unknown:
                    raise ConfigError(
                        f"stages.{i}.losses.{j} ({term.name}) reads {unknown}, but data.texts has languages "
                        f"{sorted(config.data.texts)}"
                    )
                if term.options.get("level", "pooled") != "pooled":
                    raise ConfigError(f"stages.{i}.losses.{j} ({term.name}): free texts give pooled embeddings only")
                teacher_lang = term.options.get("teacher_lang")
                if term.name != "fd" or (teacher_lang is not None and teacher_lang != term.options.get("lang")):
                    raise ConfigError(
                        f"stages.{i}.losses.{j} ({term.name}) reads {fields}: free texts have no image, no parallel "
                        "text and no pairing; only fd on the text tower reads them, with teacher_lang left out"
                    )
                for k, tcfg in enumerate(config.teachers):
                    lacking = [f for f in fields if f.removeprefix(FIELD_PREFIX) not in tcfg.languages]
                    if lacking:
                        raise ConfigError(
                            f"stages.{i}.losses.{j} ({term.name}) reads {lacking}, but teachers.{k} embeds "
                            f"{tcfg.languages} (teachers.{k}.languages)"
                        )
            if stage.texts % n_proc:
                raise ConfigError(
                    f"stages.{i}.texts = {stage.texts}: free texts are split evenly over the {n_proc} processes; give "
                    f"a multiple of {n_proc}"
                )
        if getattr(self.data, "streaming", False):
            raise ConfigError(
                f"data.texts: free texts are drawn beside samples chosen by index; the training data "
                f"({self.data.source}) is streamed: set data.streaming: false to read it map-style"
            )
        if not isinstance(self.student, DualEncoder):
            raise ConfigError("data.texts: free texts train a dual encoder's text tower; this student is not one")
        return config

    def _embed_free_texts(self, config: RecipeConfig, given) -> None:
        """Read the free texts and each teacher's embeddings of them (computed now, or read from the cache)."""
        free, tables = given if given is not None else (load_free_texts(config.data.texts), None)
        self.free = free
        self.free_tables = (
            tables
            if tables is not None
            else free_text_tables(config, free, self.teachers, _cache_of(self.teacher_source), self.accelerator)
        )
        counts = ", ".join(f"{n} {field}" for field, n in free.counts().items())
        per = ", ".join(f"{s.texts} in stages.{i}" for i, s in enumerate(config.stages) if s.texts)
        self._print(f"free texts: {counts} (data.texts), per micro-batch and language: {per}")
        few = [f"{n} {field}" for field, n in free.counts().items() if n < max(s.texts for s in config.stages)]
        if few:
            self._print(f"free texts: only {', '.join(few)}: some repeat within a micro-batch")

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, module: nn.Module, optimizer, scheduler, state: dict[str, Any]) -> Path:
        """Write atomically: a crash leaves either the previous checkpoint or the new one, never half of one."""
        if not self.accelerator.is_main_process:
            return self.ckpt_dir
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        name = f"stage{state['stage']}-step{state['step']}"
        tmp = self.ckpt_dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {
            k: v.detach().cpu().contiguous() for k, v in self.accelerator.unwrap_model(module).state_dict().items()
        }
        save_file(_untie(weights), tmp / "module.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            # this process's device; every process's generator is in the same state (same seed, same draws)
            rng["cuda"] = torch.cuda.get_rng_state()
        extra = io.BytesIO()  # serialised here, written below: a full disk then names the file, not a stream offset
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, extra)
        write_bytes(tmp / "optim.pt", extra.getbuffer())
        write_text(tmp / "state.json", json.dumps(state))  # last: a folder with state.json is a whole checkpoint
        final = self.ckpt_dir / name
        if final.exists():
            _remove_checkpoint(final)
        os.replace(tmp, final)
        write_text(self.ckpt_dir / "latest", name)
        self._prune(keep=self.cfg.train.keep_checkpoints, current=name)
        return final

    def _prune(self, keep: int, current: str) -> None:
        # Only complete checkpoints count; leftovers of crashed writes and prunes go.
        for tmp in [*self.ckpt_dir.glob(".tmp-*"), *self.ckpt_dir.glob(".del-*")]:
            shutil.rmtree(tmp, ignore_errors=True)
        ckpts = sorted(
            (p for p in self.ckpt_dir.iterdir() if not p.name.startswith(".") and _complete_checkpoint(p)),
            key=lambda p: json.loads((p / "state.json").read_text())["global_step"],
        )
        for old in ckpts[: max(0, len(ckpts) - keep)]:
            if old.name != current:
                _remove_checkpoint(old)

    def latest_checkpoint(self) -> Path | None:
        marker = self.ckpt_dir / "latest"
        if not marker.is_file():
            return None
        path = self.ckpt_dir / marker.read_text().strip()
        return path if _complete_checkpoint(path) else None

    # ------------------------------------------------------------------------------------------------- fit
    def fit(self, resume: bool = False, overwrite: bool = False) -> FitResult:
        """Train every stage (from the last checkpoint with ``resume``) in ``train.output_dir``, which this run owns
        while it trains (:class:`RunDirectory`): a directory holding another run's files is refused unless
        ``overwrite`` (which deletes them), and ``resume`` refuses a run started with another config."""
        with open_run(self.cfg, resume, overwrite):
            if self._cuda:  # process-wide switches, set for every run (a previous run may have set them otherwise)
                torch.backends.cuda.matmul.allow_tf32 = self.cfg.train.tf32
                torch.backends.cudnn.allow_tf32 = self.cfg.train.tf32
            compiled = (
                [t for m in (self.student, *self.teachers) for t in compile_towers(m)] if self.cfg.train.compile else []
            )
            try:
                return self._fit(resume)
            finally:
                for tower in compiled:  # the caller gets its student and teachers back as it gave them
                    tower._compiled_call_impl = None

    def _fit(self, resume: bool) -> FitResult:
        start_time = time.perf_counter()
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        main = self.accelerator.is_main_process
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start_stage, start_step, ckpt = 0, 0, None
        if resume:
            ckpt = self.latest_checkpoint()
            if ckpt is not None:
                state = json.loads((ckpt / "state.json").read_text())
                start_stage, start_step = state["stage"], state["step"]
                self._print(f"resuming from {ckpt} (stage {start_stage}, step {start_step})")
            else:
                self._print(f"--resume: no checkpoint in {self.ckpt_dir}; starting from scratch")
        history = self._load_history(start_stage, start_step) if ckpt else []
        self.accelerator.wait_for_everyone()  # every process has read the history before the main one rewrites it
        metrics = self.output_dir / "metrics.jsonl"
        if main:  # the rows up to the checkpoint, replaced atomically: a kill from here on loses none of them
            write_text(metrics, "".join(json.dumps(row, allow_nan=False) + "\n" for row in history))
        metrics_file = open(metrics, "a", encoding="utf-8") if main else None  # noqa: SIM115
        tb = self._tensorboard()
        try:
            for i, stage in enumerate(cfg.stages):
                if i < start_stage:
                    continue
                self._run_stage(i, stage, start_step if i == start_stage else 0, ckpt, history, metrics_file, tb)
                ckpt = None
            if ckpt is not None:  # resuming a finished run: its last checkpoint holds the final student
                self._restore_student(ckpt)
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if tb is not None:
                tb.close()
        self.student.eval()
        return FitResult(self.student, self.output_dir, history, time.perf_counter() - start_time)

    def _run_stage(self, index, stage: StageConfig, start_step, ckpt, history, metrics_file, tb) -> None:
        cfg, acc = self.cfg, self.accelerator
        if ckpt is not None and start_step == 0:
            # Written at the end of the previous stage: it carries the student and the RNG into this stage; this
            # stage's losses (their own parameters), optimiser and schedule start fresh, as in an uninterrupted run.
            self._restore_student(ckpt)
            ckpt = None
        loss = build_stage_loss(stage, self.dims, index)
        set_trainable(self.student, stage.trainable, f"stages.{index}.trainable")  # checked in __init__
        free = self.free_tables if stage.texts else ()
        module = DistillModule(self.student, loss, self.teacher_source, self._teacher_names(), free)
        module.to(acc.device)  # where Accelerate would put it: the optimiser is built on the device (fused on CUDA)
        optimizer = make_optimizer(module, stage.lr or cfg.train.lr, cfg.train.weight_decay)
        scheduler = warmup_cosine(optimizer, cfg.train.warmup_steps, stage.steps)
        if ckpt is not None:
            weights = load_file(ckpt / "module.safetensors")
            module.load_state_dict(weights)
            extra = torch.load(ckpt / "optim.pt", weights_only=True)
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            _set_rng_state(extra["rng"])
        if start_step >= stage.steps:
            return
        live = self.teachers if "teacher" in loss.needs and isinstance(self.teacher_source, LiveTeachers) else []
        views = getattr(self.teacher_source, "views", None) if "teacher" in loss.needs else None
        collate = Collator(self.student, live, cfg.data.languages, [self._teacher_fields(t) for t in live], views)
        ga = cfg.train.grad_accum
        data = self.data if stage.samples == "all" else self.paired_data
        if getattr(data, "streaming", False):
            batches = self._stream_batches(data, index, start_step * ga, collate, views)
            module, optimizer = acc.prepare(module, optimizer)
        else:
            module, optimizer, batches = self._map_batches(
                module, optimizer, data, index, stage.steps * ga, start_step * ga, collate, views, stage.texts
            )
        module.train()
        bar = tqdm(
            total=stage.steps,
            initial=start_step,
            desc=f"{stage.name}",
            disable=not (cfg.train.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        t0, seen = time.perf_counter(), 0
        for step in range(start_step, stage.steps):
            parts_sum: dict[str, float] = {}
            where = f"stage {index} ({stage.name!r}), step {step + 1} of {stage.steps}"
            for micro in range(ga):
                batch = next(batches)
                sync = acc.no_sync(module) if micro < ga - 1 else nullcontext()
                with sync, acc.autocast():
                    try:
                        total, parts = module(batch)
                    except NonFiniteError as err:  # nothing of this step is applied or saved
                        raise NonFiniteError(f"{where}: {err}; the run stopped, its last checkpoint is kept") from None
                acc.backward(total / ga)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / ga
                seen += len(batch["index"])
            if cfg.train.max_grad_norm is not None:
                norm = acc.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], cfg.train.max_grad_norm)
                # fp16 runs scale the loss and skip steps with inf gradients by design; others never see one
                if norm is not None and cfg.train.mixed_precision != "fp16" and not math.isfinite(float(norm)):
                    raise NonFiniteError(
                        f"{where}: the gradient norm is {float(norm)} (the loss was finite): training diverged; lower "
                        f"train.lr. The run stopped, its last checkpoint is kept"
                    )
            lr = scheduler.get_last_lr()[0]  # the rate this step used (scheduler.step() moves on to the next)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == stage.steps:
                row = {"stage": stage.name, "stage_index": index, "step": done, "lr": lr}
                row.update({k: round(v, 6) for k, v in self._mean_over_processes(parts_sum).items()})
                row["samples_per_second"] = round(seen * acc.num_processes / max(time.perf_counter() - t0, 1e-9), 2)
                history.append(row)
                if metrics_file is not None:
                    with disk_errors(self.output_dir / "metrics.jsonl"):
                        metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
                        metrics_file.flush()
                if tb is not None:
                    gstep = sum(s.steps for s in cfg.stages[:index]) + done
                    for k, v in row.items():
                        if isinstance(v, float):
                            tb.add_scalar(f"{stage.name}/{k}", v, gstep)
            bar.update(1)
            bar.set_postfix(loss=f"{parts_sum.get('loss', 0.0):.4f}")
            last = done == stage.steps
            if last:  # before the stage's last checkpoint, so that a run resumed from it has the same student
                _copy_logit_scale(self.student, acc.unwrap_model(module).loss)
            if last or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
                state = {"stage": index + 1 if last else index, "step": 0 if last else done}
                state["global_step"] = sum(s.steps for s in cfg.stages[:index]) + done
                self._save_checkpoint(module, optimizer, scheduler, state)
                acc.wait_for_everyone()
        bar.close()

    def _map_batches(self, module, optimizer, data, stage: int, total: int, start: int, collate, views, texts=0):
        """A map-style dataset's micro-batches (:class:`StageSampler`), prepared by Accelerate with the module and
        optimiser (each process gets its part of every global batch); ``texts`` free texts in each."""
        cfg = self.cfg
        free = (texts, list(self.free.counts().values())) if texts else None
        sampler = StageSampler(
            len(data),
            cfg.train.batch_size,
            cfg.train.seed,
            stage,
            total,
            start,
            views.count if views is not None else 1,
            epochs=hasattr(collate.student, "set_epoch"),  # span corruption by epoch: the sample carries it
            texts=free,
            pieces=self.accelerator.num_processes,
        )
        if free is not None:
            data = _WithTexts(data, self.free)
        # The loader's own generator: starting an iterator would otherwise draw from the global RNG, so a resumed run
        # (which restores the RNG before that draw) would see different dropout than an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            _WithViews(data) if views is not None or sampler.epochs else data,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=_workers(),
            persistent_workers=False,
            pin_memory=self._cuda,
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )
        module, optimizer, loader = self.accelerator.prepare(module, optimizer, loader)
        return module, optimizer, iter(loader)

    def _stream_batches(self, data, stage: int, start: int, collate, views) -> Iterator[dict[str, Any]]:
        """A streamed source's micro-batches (:meth:`~vldistill.data.streaming.ShardStream.batches`): this process
        reads only its own shards and forms its own part of every global batch, so the loader is not given to
        Accelerate (which would read every sample on every process, or on the main one, and split the batches); the
        batches are moved to this process's device here. A resumed run replays the stream deterministically."""
        cfg, acc = self.cfg, self.accelerator
        stream = data.batches(
            cfg.train.batch_size // acc.num_processes,
            cfg.train.seed,
            stage,
            start,
            acc.process_index,
            acc.num_processes,
            views.count if views is not None else 1,
        )
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,  # the stream yields lists of samples: one micro-batch each
            collate_fn=collate,
            num_workers=_workers(),
            persistent_workers=False,
            pin_memory=self._cuda,
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )
        return (send_to_device(batch, acc.device, non_blocking=self._cuda) for batch in loader)

    def _teacher_names(self) -> list[str]:
        """How errors name each teacher: its hub id or directory (and the cache it is read from)."""
        names = []
        for j, tcfg in enumerate(self.cfg.teachers):
            loaded = getattr(self.teachers[j].model, "name_or_path", "") if j < len(self.teachers) else ""
            name = tcfg.name_or_path or loaded or f"teacher {j}"
            names.append(f"{name}, read from the cache {tcfg.cache}" if tcfg.source == "cache" else name)
        return names

    def _teacher_fields(self, teacher: Teacher) -> list[str]:
        """The text fields a live teacher embeds: its caption languages for image-text pairs; for task samples
        (VQA, entailment, multiple choice) every field of ``teacher_texts`` (question, qa, hypothesis, candidates)."""
        if getattr(self.data, "streaming", False):  # streams hold image-caption pairs
            return _teacher_langs(teacher, self.cfg)
        first = self.data[0]
        if "captions" in first:
            return _teacher_langs(teacher, self.cfg)
        return sorted(teacher_texts(first))

    def _mean_over_processes(self, parts: dict[str, float]) -> dict[str, float]:
        """The logged loss terms, averaged over processes (terms on token features are computed per shard)."""
        if self.accelerator.num_processes == 1:
            return parts
        keys = list(parts)
        values = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(values, "mean").tolist(), strict=True))

    # ---------------------------------------------------------------------------------------------- helpers
    def _restore_student(self, ckpt: Path) -> None:
        """Load only the student's weights and the RNG state from a checkpoint (not the losses or the optimiser)."""
        weights = load_file(ckpt / "module.safetensors")
        self.student.load_state_dict(
            {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
        )
        _set_rng_state(torch.load(ckpt / "optim.pt", weights_only=True)["rng"])

    def _load_history(self, stage: int, step: int) -> list[dict[str, Any]]:
        """The logged rows up to the checkpoint at (``stage``, ``step``); a line a kill cut short is dropped."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and {"stage_index", "step"} <= row.keys():
                rows.append(row)
        return [r for r in rows if (r["stage_index"], r["step"]) <= (stage, step) or r["stage_index"] < stage]

    def _tensorboard(self):
        if not (self.cfg.train.tensorboard and self.accelerator.is_main_process):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.output_dir / "tb"))

    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, flush=True)


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        cuda = rng["cuda"]
        torch.cuda.set_rng_state_all(cuda) if isinstance(cuda, list) else torch.cuda.set_rng_state(cuda)


def _accelerator(mixed_precision: str) -> Accelerator:
    """Accelerate keeps one process-wide state; in a single process (the quickstart trains a teacher, a student
    and a baseline in a row, maybe with different precisions) a new run may reset it. Under ``accelerate launch``
    the state belongs to the launcher and is kept."""
    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") not in (None, mixed_precision)
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
    ):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    cuda = torch.cuda.is_available()
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=not cuda,
        # train.batch_size is the global batch; on CUDA the (pinned) batches are copied without waiting
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=cuda),
    )


def compile_towers(student: nn.Module) -> list[nn.Module]:
    """Compile the student's towers in place (``nn.Module.compile``: parameter names, checkpoints and exports are
    unchanged); return them, so that the caller can give them back uncompiled. A dual encoder's towers are its
    model's ``vision_model`` and ``text_model`` (every supported family names them so: the pooling and projections
    around them are small); another student kind's are its direct submodules that hold parameters."""
    model = getattr(student, "model", None)
    towers = [getattr(model, name) for name in ("vision_model", "text_model") if hasattr(model, name)]
    if not towers:
        towers = [m for m in student.children() if any(True for _ in m.parameters())]
    for tower in towers:
        tower.compile()
    return towers


def free_terms_of(term) -> list[str]:
    """The free-text fields (``texts.LANG``) a loss term reads."""
    keys = ("lang", "teacher_lang", "langs", "target_lang")
    return [f for k in keys for f in free_fields_of(term.options.get(k))]


def free_terms(stage: StageConfig) -> list[tuple[int, Any]]:
    """The stage's loss terms that read free texts, with their positions."""
    return [(j, t) for j, t in enumerate(stage.losses) if free_terms_of(t)]


def _cache_of(source) -> tuple[Path, list[dict[str, Any]]] | None:
    """A teacher cache's directory and its entries of the run's teachers; ``None`` for live teachers."""
    return (source.directory, source.teacher_entries()) if hasattr(source, "teacher_entries") else None


def free_text_tables(
    cfg: RecipeConfig,
    free: FreeTexts,
    teachers: Sequence[Teacher],
    cache: tuple[Path, list[dict[str, Any]]] | None = None,
    accelerator: Accelerator | None = None,
) -> list[FreeTextTable]:
    """Each teacher's embeddings of the free texts of the languages it embeds (``teachers.N.languages``): read from
    the teacher cache (``cache``: its directory and the manifest entries of the run's teachers) when it holds them,
    else computed with the loaded teachers (loading them, onto the run's device, when the run reads a cache without
    them) and stored in the cache. Several processes: the main one computes and stores, the others then read."""
    entries = cache[1] if cache is not None else None
    langs = [list(t.languages) for t in cfg.teachers]
    path = free_text_file(cache[0], entries, langs, free) if cache is not None else None
    several = accelerator is not None and accelerator.num_processes > 1 and path is not None
    if several and not accelerator.is_main_process:
        accelerator.wait_for_everyone()  # the main process stores the tables first
    tables = load_free_text_tables(path, len(entries), len(free)) if path is not None else None
    if tables is None:
        teachers = list(teachers) or prepare_teachers(cfg)
        device = accelerator.device if accelerator is not None else None
        names = [tc.name_or_path or f"teacher {j}" for j, tc in enumerate(cfg.teachers)]
        tables = []
        for t, lang, name in zip(teachers, langs, names, strict=True):
            if device is not None:
                t.to(device)
            tables.append(free_text_table(t, free, lang, name=name))
        if path is not None:
            save_free_text_tables(path, tables)
    if several and accelerator.is_main_process:
        accelerator.wait_for_everyone()
    return tables


def _teacher_langs(teacher: Teacher, cfg: RecipeConfig) -> list[str]:
    # The loaded teacher's own languages (prepare_teachers sets them from the recipe's teachers.N.languages).
    return [lang for lang in cfg.data.languages if lang in getattr(teacher, "languages", ["en"])]


def _workers() -> int:
    # Workers pay off when preprocessing is heavy (real images); tiny bundled images decode faster in-process.
    return int(os.environ.get("VLDISTILL_WORKERS", "0"))


def _untie(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share storage; clone the duplicates."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a kill while deleting leaves a ``.del-*`` folder (removed by the next run), never a
    checkpoint folder with some of its files gone."""
    trash = path.with_name(f".del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _copy_logit_scale(student: DualEncoder, loss: WeightedLoss) -> None:
    """Export the contrastive scale learnt by a ``clip`` term, so the saved student's scores are calibrated."""
    log_s = getattr(getattr(student, "model", None), "logit_scale", None)  # dual encoders only
    for _, _, term in loss.terms:
        term_log_s = getattr(term, "log_s", None)
        if log_s is not None and isinstance(term_log_s, nn.Parameter) and term.__class__.__name__ == "ClipLoss":
            with torch.no_grad():
                log_s.copy_(term_log_s.detach().clamp(max=math.log(100.0)))
