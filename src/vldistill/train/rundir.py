"""A run owns its output directory: new runs refuse another run's files, ``--resume`` checks the config, a lock keeps
a second process out, and half-deleted checkpoints are cleaned up."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import RecipeConfig, to_dict
from ..files import write_text

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "checkpoints",
    "student-init",
    ".tmp-student-init",
    "student",
    "teacher",
    "baseline",
    "adapt",
    "adapted-teacher",
    "adapt.json",
    "eval.json",
    "tb",
)
"""What runs write into their output directory: a new run finds none of them there, or removes them all when told
to (``overwrite``). Other files (a manifest, images, notes) are the user's and stay."""
LOCK_FILE = ".vldistill.lock"
RESUME_FREE = (
    "tiny",
    "train.output_dir",
    "train.progress",
    "train.tensorboard",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.compile",
    "eval",
    "data.eval",
    "data.eval_split",
    "data.limit_eval",
    "cache.workers",
    "cache.batch_size",
)
"""Config keys a resumed run may change: where and how the run is shown, checkpointed and evaluated afterwards, not
what it computes. Every other key must equal the value in the run's ``config.json``."""
_HELD: dict[Path, int] = {}  # run directories this process has claimed (nested claims of one run are no-ops)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; one process per directory is then on the user
    fcntl = None


class RunError(ValueError):
    """A run directory that another run owns or uses, or a resume whose config differs from the run's."""


class RunDirectory:
    """A run's output directory, owned by one run and written by one process at a time.

    :func:`open_run` claims it: it takes the directory's lock (an ``flock`` on ``.vldistill.lock``, released by the
    kernel when the process ends, however it ends), then, for a new run, refuses a directory holding another run's
    files (:data:`RUN_FILES`) unless ``overwrite`` (which removes them), and for ``resume`` compares the stored
    ``config.json`` with the run's resolved config (keys in :data:`RESUME_FREE` may differ; keys one side does not
    have, e.g. a field added to vldistill since, are not compared). Leftovers of killed checkpoint writes and
    prunes are removed. Then it writes ``config.json``. Use it as a context manager, or call :meth:`release`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._key = Path(os.path.abspath(self.path))
        self._fd: int | None = None
        self._nested = False

    def claim(self, cfg: RecipeConfig, resume: bool = False, overwrite: bool = False, main: bool = True) -> None:
        """Take the directory for ``cfg`` (on the main process: lock, check, clean, write ``config.json``)."""
        if resume and overwrite:
            raise RunError("resume and overwrite: choose one (--resume continues the run, --overwrite replaces it)")
        if self._key in _HELD:  # e.g. fit_recipe -> Trainer.fit, or MAD's distillation inside its recipe's run
            self._nested = True
            _HELD[self._key] += 1
            return
        if main:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            try:
                for trash in self.path.glob(".del-*"):  # what a kill during an --overwrite left
                    shutil.rmtree(trash, ignore_errors=True)
                if resume:
                    self._check_resume(cfg)
                else:
                    self._check_new(overwrite)
                clean_checkpoints(self.path / "checkpoints")
                write_text(self.path / "config.json", json.dumps(to_dict(cfg), indent=2, ensure_ascii=False))
            except BaseException:
                self._unlock()
                raise
        _HELD[self._key] = 1

    def release(self) -> None:
        """Give the directory back (the outermost claim of this process unlocks it)."""
        if self._key not in _HELD:
            return
        _HELD[self._key] -= 1
        if _HELD[self._key] <= 0:
            del _HELD[self._key]
            self._unlock()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -------------------------------------------------------------------------------------------------- checks
    def _check_new(self, overwrite: bool) -> None:
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        # a run that stopped before it saved anything (bad data, a wrong key) leaves config.json alone: nothing to mix
        trained = [name for name in found if name not in ("config.json", ".tmp-student-init")]
        if not found:
            return
        if trained and not overwrite:
            raise RunError(
                f"{self.path} holds another run ({', '.join(found)}); a new run never mixes with it: continue that "
                f"run with --resume, replace it with --overwrite (deletes those files), or give another --output"
            )
        # config.json last: a kill while deleting leaves a directory whose remaining files still name their run
        for name in sorted(found, key=lambda n: n == "config.json"):
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                trash = self.path / f".del-{name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(path, trash)
                shutil.rmtree(trash)
            else:
                path.unlink()

    def _check_resume(self, cfg: RecipeConfig) -> None:
        stored = self.path / "config.json"
        if not stored.is_file():
            found = [name for name in RUN_FILES if (self.path / name).exists() and name != ".tmp-student-init"]
            if found:
                raise RunError(
                    f"--resume: {self.path} holds {', '.join(found)} but no config.json, so nothing tells which run "
                    f"they belong to; replace them with --overwrite, or give another --output"
                )
            return
        try:
            old = json.loads(stored.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise RunError(f"--resume: {stored} is damaged ({err}); replace the run with --overwrite") from None
        diffs = config_differences(old, to_dict(cfg))
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise RunError(
                f"--resume: the run in {self.path} was started with another config ({len(diffs)} key"
                f"{'s' if len(diffs) > 1 else ''} differ: {shown}); resume it with its own settings, replace it with "
                f"--overwrite, or give another --output"
            )

    # ---------------------------------------------------------------------------------------------------- lock
    def _lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunError(
                f"{self.path} is being written by another vldistill process (pid {holder}); two processes never "
                f"write one run directory: wait for it to end, or give another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def open_run(cfg: RecipeConfig, resume: bool = False, overwrite: bool = False) -> RunDirectory:
    """Claim ``cfg.train.output_dir`` for this run (see :class:`RunDirectory`). In a multi-process run the main
    process claims it and every process raises its error, so none is left waiting for the others."""
    run = RunDirectory(cfg.train.output_dir)
    rank, world = _rank_and_world()
    error = None
    try:
        run.claim(cfg, resume, overwrite, main=rank == 0)
    except RunError as err:
        error = str(err)
    if world > 1:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
        if error is not None:
            run.release()
    if error is not None:
        raise RunError(error)
    return run


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, initialising the process group under ``accelerate launch``
    or ``torchrun`` (Accelerate does the same, later, with the same device choice)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes
    return 0, 1


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key (OLD there, NEW now)"`` for every dotted key both configs have whose values differ (keys in
    :data:`RESUME_FREE` aside); a list of sections (stages, losses, teachers) of another length counts once."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in b:
        if key not in a or any(key == f or key.startswith(f + ".") for f in RESUME_FREE):
            continue
        if a[key] != b[key]:
            out.append(f"{key} ({_shown(a[key])} there, {_shown(b[key])} now)")
    return out


class _Items(int):
    """The length of a list of sections, as a flattened value."""

    def __repr__(self) -> str:
        return f"{int(self)} items"


#: Mappings whose keys are data, compared whole: a language of free texts more or fewer changes every batch, where a
#: key new on one side would otherwise pass as a field added with its default.
WHOLE_VALUES = ("data.texts",)


def _flatten(value: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {} if out is None else out
    if isinstance(value, dict) and prefix not in WHOLE_VALUES:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
        out[prefix] = _Items(len(value))
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}.{i}", out)
    else:
        out[prefix] = value
    return out


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, _Items) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def clean_checkpoints(ckpt_dir: Path) -> None:
    """Remove what killed processes left in a checkpoint folder: half-written checkpoints (``.tmp-*``), checkpoints
    being pruned (``.del-*``), and any other checkpoint folder that is incomplete and not the latest."""
    if not ckpt_dir.is_dir():
        return
    marker = ckpt_dir / "latest"
    latest = marker.read_text().strip() if marker.is_file() else None
    (ckpt_dir / "latest.tmp").unlink(missing_ok=True)
    for path in ckpt_dir.iterdir():
        if path.name.startswith((".tmp-", ".del-")) or (
            path.is_dir() and path.name != latest and not _complete_checkpoint(path)
        ):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


CHECKPOINT_FILES = ("module.safetensors", "optim.pt", "state.json")


def _complete_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES)
