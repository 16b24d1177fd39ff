"""Tests for vldistill.train.loop: resume equivalence, atomic checkpoints, gradient accumulation, frozen towers and
teachers, run outputs, mixed precision and bad recipes. Tiny ``test-clip`` models on 64 bundled easy-VQA samples."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

import vldistill.train.loop as trainer_mod
from helpers import assert_same_rows, read_metrics, without_timing
from vldistill.config import ConfigError, DataConfig, RecipeConfig, load_recipe, to_dict
from vldistill.data.sources import LabelledData
from vldistill.models import DualEncoder, Teacher, as_teacher
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import fit_recipe, load_train_data, tokenizer_corpus
from vldistill.train.loop import FitResult, StageSampler, Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

N_TRAIN = 64
LANGS = ["en", "zh"]
VISION_PREFIXES = ("vision_model.", "visual_projection.")
TEXT_PREFIXES = ("text_model.", "text_projection.")

# Stage 1 distils (fd image, cross-lingual text) with a little contrastive loss, stage 2 aligns and adds an fd
# term whose adapter is created (from the RNG) when the stage starts: a resumed run must reproduce that too.
TWO_STAGES = [
    {
        "name": "distill",
        "steps": 6,
        "losses": [
            {"name": "fd", "tower": "image", "weight": 10},
            {"name": "xling", "langs": ["zh"], "weight": 10},
            {"name": "clip", "weight": 0.1},
        ],
    },
    {"name": "align", "steps": 4, "losses": ["clip", {"name": "fd", "tower": "text", "lang": "en"}], "lr": 1e-3},
]


class Crash(Exception):
    """Stands in for a killed process."""


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data() -> LabelledData:
    return load_train_data(DataConfig(train="bundled:easyvqa", eval=None, languages=LANGS, limit_train=N_TRAIN))


@pytest.fixture(scope="module")
def tokenizer(data: LabelledData):
    return train_wordpiece(tokenizer_corpus(data, LANGS), vocab_size=300)


@pytest.fixture(scope="module")
def teacher(tokenizer) -> Teacher:
    """A frozen CLIP wider than the student (48-wide towers, 24-d embeddings vs 32 and 16): adapters are needed."""
    torch.manual_seed(123)
    widths = {
        f"{tower}.{key}": size
        for tower in ("vision", "text")
        for key, size in (("hidden_size", 48), ("intermediate_size", 96))
    }
    encoder = build_student("test-clip", tokenizer, projection_dim=24, **widths)
    assert encoder.dims.embed == 24 and encoder.dims.image_width == 48
    return as_teacher(encoder, languages=["en"])


@pytest.fixture(scope="module")
def make_student(tokenizer) -> Callable[..., DualEncoder]:
    def make(dropout: float = 0.0) -> DualEncoder:
        torch.manual_seed(0)
        overrides = {"text.attention_dropout": dropout, "vision.attention_dropout": dropout} if dropout else {}
        return build_student("test-clip", tokenizer, **overrides)

    return make


def recipe(output_dir: Path, stages: list[dict] | None = None, teacher: bool = True, **train: Any) -> RecipeConfig:
    raw: dict[str, Any] = {
        "name": "test",
        "student": {"preset": "test-clip"},
        "data": {"train": "bundled:easyvqa", "eval": None, "languages": LANGS, "limit_train": N_TRAIN},
        "stages": stages if stages is not None else [{"steps": 2, "losses": ["clip"]}],
        "train": {
            "batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
            "output_dir": str(output_dir),
            **train,
        },
    }
    if teacher:
        raw["teacher"] = {"languages": ["en"]}
    return load_recipe(raw=raw)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def crash_after_step(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Kill the run right after optimiser step ``k`` (counted over all stages) was taken and logged, before a
    checkpoint of that step could be written: the point where a killed process loses the most work."""

    def arm(k: int) -> None:
        count = itertools.count(1)
        real_tqdm = trainer_mod.tqdm

        def tqdm(*args, **kwargs):
            bar = real_tqdm(*args, **kwargs)
            update = bar.update

            def crashing_update(n: int = 1):
                if next(count) == k:
                    raise Crash(f"killed after step {k}")
                return update(n)

            bar.update = crashing_update
            return bar

        monkeypatch.setattr(trainer_mod, "tqdm", tqdm)

    return arm


@pytest.fixture
def crash_writing_checkpoint(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Kill the run while checkpoint ``name`` is being written (its weights are on disk, the rest is not)."""

    def arm(name: str) -> None:
        real_save = trainer_mod.save_file

        def save_file(tensors, path, *args, **kwargs):
            real_save(tensors, path, *args, **kwargs)
            if Path(path).parent.name == f".tmp-{name}":
                raise Crash(f"killed while writing {name}")

        monkeypatch.setattr(trainer_mod, "save_file", save_file)

    return arm


# ------------------------------------------------------------------------------------------ resume equivalence
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, teacher, make_student) -> Callable[[int], dict[str, Any]]:
    """Run A, once per grad_accum: the two-stage recipe from start to end without interruption."""
    cache: dict[int, dict[str, Any]] = {}

    def run(grad_accum: int) -> dict[str, Any]:
        if grad_accum not in cache:
            AcceleratorState._reset_state(True)
            out = tmp_path_factory.mktemp(f"uninterrupted-ga{grad_accum}")
            cfg = recipe(out, TWO_STAGES, grad_accum=grad_accum, checkpoint_every=2, keep_checkpoints=2)
            teacher_before = weights(teacher)
            result = Trainer(cfg, make_student(dropout=0.1), data.dataset, [teacher]).fit()
            cache[grad_accum] = {
                "cfg": cfg,
                "result": result,
                "weights": weights(result.student),
                "metrics": read_metrics(out),
                "teacher_before": teacher_before,
                "teacher_after": weights(teacher),
            }
        return cache[grad_accum]

    return run


RESUME_CASES = [
    # (grad_accum, how the first run dies, where it dies, checkpoint the second run resumes from)
    pytest.param(1, "after_step", 3, "stage0-step2", id="mid-stage-1"),
    pytest.param(2, "after_step", 5, "stage0-step4", id="mid-stage-1-grad-accum"),
    pytest.param(1, "after_step", 6, "stage0-step4", id="last-step-of-stage-1"),
    pytest.param(1, "after_step", 7, "stage1-step0", id="stage-boundary"),
    pytest.param(2, "after_step", 7, "stage1-step0", id="stage-boundary-grad-accum"),
    pytest.param(1, "after_step", 9, "stage1-step2", id="mid-stage-2"),
    pytest.param(1, "writing", "stage0-step4", "stage0-step2", id="while-writing-a-checkpoint"),
]


@pytest.mark.parametrize(("grad_accum", "how", "where", "resumes_from"), RESUME_CASES)
def test_resumed_run_matches_uninterrupted_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    data,
    teacher,
    make_student,
    uninterrupted,
    crash_after_step,
    crash_writing_checkpoint,
    grad_accum: int,
    how: str,
    where,
    resumes_from: str,
) -> None:
    a = uninterrupted(grad_accum)
    cfg = recipe(tmp_path, TWO_STAGES, grad_accum=grad_accum, checkpoint_every=2, keep_checkpoints=2)
    ckpt_dir = tmp_path / "checkpoints"

    (crash_after_step if how == "after_step" else crash_writing_checkpoint)(where)
    with pytest.raises(Crash):
        Trainer(cfg, make_student(dropout=0.1), data.dataset, [teacher]).fit()
    assert (ckpt_dir / "latest").read_text() == resumes_from
    if how == "writing":  # the half-written checkpoint is left behind, as after a kill
        assert (ckpt_dir / f".tmp-{where}" / "module.safetensors").is_file()
        assert not (ckpt_dir / f".tmp-{where}" / "state.json").exists()
    else:  # the step that was lost is in the log already
        last = read_metrics(tmp_path)[-1]
        assert last["stage_index"] * TWO_STAGES[0]["steps"] + last["step"] == where

    monkeypatch.undo()  # the process is gone; a new one resumes
    AcceleratorState._reset_state(True)
    capsys.readouterr()
    b = Trainer(cfg, make_student(dropout=0.1), data.dataset, [teacher]).fit(resume=True)
    assert f"resuming from {ckpt_dir / resumes_from}" in capsys.readouterr().out

    b_weights = weights(b.student)
    assert b_weights.keys() == a["weights"].keys()
    for name, value in a["weights"].items():
        torch.testing.assert_close(b_weights[name], value, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")

    rows = read_metrics(tmp_path)
    steps = [(r["stage_index"], r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    assert steps == [(r["stage_index"], r["step"]) for r in a["metrics"]]
    assert_same_rows(rows, a["metrics"])
    assert without_timing(b.history) == without_timing(rows)
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]


def test_resuming_a_finished_run_keeps_the_final_student(tmp_path, data, teacher, make_student, uninterrupted) -> None:
    a = uninterrupted(1)
    cfg = recipe(tmp_path, TWO_STAGES, checkpoint_every=2, keep_checkpoints=2)
    Trainer(cfg, make_student(dropout=0.1), data.dataset, [teacher]).fit()
    AcceleratorState._reset_state(True)
    again = Trainer(cfg, make_student(dropout=0.1), data.dataset, [teacher]).fit(resume=True)
    for name, value in weights(again.student).items():
        torch.testing.assert_close(value, a["weights"][name], rtol=1e-6, atol=1e-7)
    assert_same_rows(read_metrics(tmp_path), a["metrics"])


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, capsys, data, make_student) -> None:
    cfg = recipe(tmp_path, teacher=False)
    result = Trainer(cfg, make_student(), data.dataset).fit(resume=True)
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in result.history] == [1, 2]


def test_fit_recipe_resume_rebuilds_student_from_its_saved_init(
    tmp_path, monkeypatch, data, teacher, crash_after_step
) -> None:
    """The command-line path: no student is passed in; ``--resume`` reloads ``student-init`` (and its tokenizer)."""

    def config(out: Path) -> RecipeConfig:
        cfg = recipe(out, TWO_STAGES, checkpoint_every=2)
        cfg.student.overrides = {"text.attention_dropout": 0.1}
        cfg.student.vocab_size = 300
        return cfg

    fit_recipe(config(tmp_path / "a"), teachers=[teacher], train_data=data)
    crash_after_step(3)
    AcceleratorState._reset_state(True)
    with pytest.raises(Crash):
        fit_recipe(config(tmp_path / "b"), teachers=[teacher], train_data=data)
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    summary = fit_recipe(config(tmp_path / "b"), resume=True, teachers=[teacher], train_data=data)
    a = load_file(tmp_path / "a" / "student" / "model.safetensors")
    b = load_file(Path(summary["student_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ atomic checkpoints
def test_checkpoints_are_complete_and_pruned(data, teacher, uninterrupted) -> None:
    a = uninterrupted(1)
    result: FitResult = a["result"]
    ckpt_dir = result.output_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "stage1-step2", "stage2-step0"]  # keep 2
    latest = ckpt_dir / (ckpt_dir / "latest").read_text()
    assert latest.name == "stage2-step0"
    assert sorted(p.name for p in latest.iterdir()) == ["module.safetensors", "optim.pt", "state.json"]
    assert json.loads((latest / "state.json").read_text()) == {"stage": 2, "step": 0, "global_step": 10}
    assert json.loads((ckpt_dir / "stage1-step2" / "state.json").read_text())["global_step"] == 8

    module = load_file(latest / "module.safetensors")
    student = {k.removeprefix("student."): v for k, v in module.items() if k.startswith("student.")}
    assert student.keys() == a["weights"].keys()
    for name, value in student.items():
        torch.testing.assert_close(value, a["weights"][name], rtol=0, atol=0)
    assert any(k.startswith("loss.losses.fd_text_en.adapters.") for k in module)  # loss state is in the run
    extra = torch.load(latest / "optim.pt", weights_only=True)
    assert set(extra) == {"optimizer", "scheduler", "rng"}

    assert Trainer(a["cfg"], result.student, data.dataset, [teacher]).latest_checkpoint() == latest


def test_latest_marker_to_incomplete_checkpoint_is_ignored(tmp_path, data, make_student) -> None:
    cfg = recipe(tmp_path, teacher=False)
    trainer = Trainer(cfg, make_student(), data.dataset)
    assert trainer.latest_checkpoint() is None
    (tmp_path / "checkpoints" / "stage0-step1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("stage0-step1")
    assert trainer.latest_checkpoint() is None  # no state.json: not a checkpoint


# ---------------------------------------------------------------------------------------- gradient accumulation
def test_stage_sampler_batches_cover_each_epoch_once() -> None:
    sampler = StageSampler(n=20, batch_size=4, seed=0, stage=0, total=12)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 12
    assert all(len(b) == 4 for b in batches)
    for epoch in range(2):  # 5 batches per epoch
        seen = [i for b in batches[5 * epoch : 5 * epoch + 5] for i in b]
        assert sorted(seen) == list(range(20))
    assert batches[:5] != batches[5:10], "epochs are reshuffled"
    tail = [i for b in batches[10:] for i in b]
    assert len(set(tail)) == len(tail)


def test_stage_sampler_is_a_pure_function_of_seed_stage_and_position() -> None:
    def seq(seed: int = 0, stage: int = 0, start: int = 0) -> list[list[int]]:
        return list(StageSampler(n=30, batch_size=8, seed=seed, stage=stage, total=10, start=start))

    assert seq() == seq()
    assert seq(seed=1) != seq()
    assert seq(stage=1) != seq()
    for start in (0, 1, 3, 4, 9, 10):
        assert seq(start=start) == seq()[start:]
        assert len(StageSampler(30, 8, 0, 0, 10, start)) == 10 - start


def test_stage_sampler_needs_a_full_batch() -> None:
    with pytest.raises(ValueError, match=r"fewer than train\.batch_size = 8"):
        StageSampler(n=5, batch_size=8, seed=0, stage=0, total=1)


def test_grad_accum_feeds_steps_times_accum_micro_batches(tmp_path, data, make_student, monkeypatch) -> None:
    seen: list[list[int]] = []
    real_forward = trainer_mod.DistillModule.forward

    def forward(self, batch):
        seen.append(batch["index"].tolist())
        return real_forward(self, batch)

    monkeypatch.setattr(trainer_mod.DistillModule, "forward", forward)
    cfg = recipe(tmp_path, [{"steps": 5, "losses": ["clip"]}], teacher=False, grad_accum=3, seed=7)
    result = Trainer(cfg, make_student(), data.dataset).fit()
    indices = [data.dataset[i]["index"] for i in range(N_TRAIN)]
    expected = [[indices[i] for i in b] for b in StageSampler(N_TRAIN, 8, seed=7, stage=0, total=15)]
    assert seen == expected  # 5 steps x 3 micro-batches of 8, in the sampler's order
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5]


def test_grad_accum_equals_a_larger_batch_for_per_sample_losses(
    tmp_path, monkeypatch, data, teacher, make_student
) -> None:
    """fd and xling average over samples, and a step of 2 micro-batches of 8 sees the same 16 samples as one batch of
    16 (one epoch is 64 samples), so both runs compute the same gradients. Plain SGD keeps the comparison linear in
    them (AdamW's first steps are ~lr * sign(grad), which turns float noise in near-zero gradients into full steps)."""

    def sgd(module, lr, weight_decay):
        return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)

    monkeypatch.setattr(trainer_mod, "make_optimizer", sgd)
    stages = [
        {
            "steps": 3,
            "losses": [
                {"name": "fd", "tower": "image", "weight": 10},
                {"name": "xling", "langs": ["zh"], "weight": 10},
            ],
        }
    ]
    init = weights(make_student())
    train = {"lr": 0.5, "max_grad_norm": None}  # clipping would hide a wrongly scaled accumulated gradient
    accum = Trainer(
        recipe(tmp_path / "accum", stages, batch_size=8, grad_accum=2, **train), make_student(), data.dataset, [teacher]
    ).fit()
    AcceleratorState._reset_state(True)
    large = Trainer(
        recipe(tmp_path / "large", stages, batch_size=16, **train), make_student(), data.dataset, [teacher]
    ).fit()
    accum_w, large_w = weights(accum.student), weights(large.student)
    moved = 0
    for name, value in init.items():
        delta_large = large_w[name] - value
        torch.testing.assert_close(
            accum_w[name] - value, delta_large, rtol=1e-3, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved += int(delta_large.abs().max() > 1e-4)
    assert moved > 10, "the runs barely trained: the comparison says little"
    for row_a, row_l in zip(accum.history, large.history, strict=True):
        assert row_a["loss"] == pytest.approx(row_l["loss"], rel=1e-5)


# --------------------------------------------------------------------------------------- frozen towers, teacher
@pytest.mark.parametrize(("trainable", "frozen"), [("text", VISION_PREFIXES), ("image", TEXT_PREFIXES)])
def test_frozen_tower_is_bit_identical(tmp_path, data, make_student, trainable: str, frozen: tuple) -> None:
    student = make_student()
    before = weights(student.model)
    cfg = recipe(tmp_path, [{"steps": 2, "losses": ["clip"], "trainable": [trainable]}], teacher=False, lr=1e-2)
    Trainer(cfg, student, data.dataset).fit()
    after = weights(student.model)
    trained = TEXT_PREFIXES if trainable == "text" else VISION_PREFIXES
    frozen_names = [k for k in before if k.startswith(frozen)]
    trained_names = [k for k in before if k.startswith(trained)]
    assert frozen_names and trained_names
    for name in frozen_names:
        assert torch.equal(before[name], after[name]), f"{name} changed although its tower is frozen"
    changed = [name for name in trained_names if not torch.equal(before[name], after[name])]
    assert changed == trained_names, f"unchanged trainable parameters: {sorted(set(trained_names) - set(changed))}"


def test_teacher_stays_frozen_and_in_eval_mode(tmp_path, data, teacher, make_student, monkeypatch) -> None:
    modes: list[bool] = []
    real_call = trainer_mod.LiveTeachers.__call__

    def call(self, batch, needs):
        modes.extend(m.training for t in self.teachers for m in t.modules())
        return real_call(self, batch, needs)

    monkeypatch.setattr(trainer_mod.LiveTeachers, "__call__", call)
    before = weights(teacher)
    cfg = recipe(tmp_path, [{"steps": 3, "losses": [{"name": "fd", "tower": "image"}, "clip"]}], lr=1e-2)
    Trainer(cfg, make_student(dropout=0.1), data.dataset, [teacher]).fit()
    assert modes and not any(modes), "a teacher module was in train mode during the run"
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    after = weights(teacher)
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"teacher weight {name} changed"


def test_teacher_unchanged_by_the_two_stage_run(uninterrupted) -> None:
    a = uninterrupted(1)
    for name, value in a["teacher_before"].items():
        assert torch.equal(value, a["teacher_after"][name])


# ---------------------------------------------------------------------------------------------------- outputs
def test_fit_recipe_writes_metrics_tensorboard_config_and_hf_student(tmp_path, data, teacher, make_student) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stages = [
        {"name": "distill", "steps": 2, "losses": [{"name": "fd", "tower": "image"}, {"name": "xling"}]},
        {"name": "align", "steps": 2, "losses": [{"name": "clip", "langs": ["en", "zh"]}]},
    ]
    cfg = recipe(tmp_path, stages, tensorboard=True)
    student = make_student()
    summary = fit_recipe(cfg, teachers=[teacher], student=student, train_data=data)
    assert summary["output_dir"] == str(tmp_path)
    assert "eval" not in summary and not (tmp_path / "eval.json").exists()  # data.eval: null

    rows = read_metrics(tmp_path)
    assert [(r["stage"], r["step"]) for r in rows] == [("distill", 1), ("distill", 2), ("align", 1), ("align", 2)]
    for row in rows[:2]:
        assert {"fd_image", "xling", "xling/zh", "xling/en", "loss", "lr", "samples_per_second"} <= row.keys()
        assert row["loss"] == pytest.approx(row["fd_image"] + row["xling"], abs=1e-5)
    for row in rows[2:]:
        assert {"clip", "clip/scale", "clip/en", "clip/zh", "loss"} <= row.keys()
    assert summary["final"] == rows[-1]
    # the rate each step used: warm-up (1 step here: warmup_steps is capped at steps - 1), then cosine to zero
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 2e-3, 1e-3, 2e-3])

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"distill/fd_image", "distill/loss", "align/clip"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("align/clip")] == [3, 4]  # global steps

    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(to_dict(cfg)))

    export = Path(summary["student_dir"])
    assert export == tmp_path / "student" and (tmp_path / "student-init").is_dir()
    model = AutoModel.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    processor = AutoImageProcessor.from_pretrained(export)
    assert model.config.model_type == "clip"
    assert not list(export.glob("*.bin")) and (export / "model.safetensors").is_file()
    images = [data.dataset[i]["image"] for i in range(3)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    enc = tok(["a red circle", "一个蓝色的正方形"], padding=True, return_tensors="pt")
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values=pixels).pooler_output, student.encode_image(pixels)
        )
        torch.testing.assert_close(
            model.get_text_features(**enc).pooler_output, student.encode_text(enc["input_ids"], enc["attention_mask"])
        )
    # the scale learnt by the clip term is exported with the student
    assert model.logit_scale.item() != pytest.approx(make_student().model.logit_scale.item(), abs=1e-6)


def test_bf16_mixed_precision_runs_on_cpu(tmp_path, data, make_student) -> None:
    student = make_student()
    before = weights(student)
    cfg = recipe(tmp_path, [{"steps": 2, "losses": ["clip"]}], teacher=False, mixed_precision="bf16")
    result = Trainer(cfg, student, data.dataset).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert all(v.dtype == torch.float32 for v in weights(student).values())  # autocast, not a bf16 model
    assert any(not torch.equal(v, weights(student)[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------------ bad recipes
def test_teacher_loss_without_teacher_fails_before_training(tmp_path, data, make_student) -> None:
    stages = [{"steps": 2, "losses": ["clip"]}, {"steps": 2, "losses": [{"name": "fd", "tower": "image"}]}]
    cfg = recipe(tmp_path / "run", stages, teacher=False)
    with pytest.raises(ConfigError, match=r"stages\.1\.losses\.0.*teacher"):
        Trainer(cfg, make_student(), data.dataset)
    assert not (tmp_path / "run").exists(), "the error came after training had started"


@pytest.mark.parametrize(
    ("loss", "patterns"),
    [
        ({"name": "fdd"}, [r"stages\.0\.losses\.0\.name: unknown loss 'fdd'; registered: ", "clip", "fd", "xling"]),
        ({"name": "fd", "towr": "image"}, [r"stages\.0\.losses\.0 \(fd\)", "'towr'", r"allowed options: .*tower"]),
        ({"name": "fd", "tower": "audio"}, [r"stages\.0\.losses\.0 \(fd\)", r"tower='audio'", "'image', 'text'"]),
        ({"name": "xling", "langs": "zh"}, [r"stages\.0\.losses\.0 \(xling\)", r"langs='zh'"]),
    ],
)
def test_bad_loss_names_its_recipe_key(tmp_path, data, teacher, make_student, loss: dict, patterns: list) -> None:
    cfg = recipe(tmp_path, [{"steps": 1, "losses": [loss]}])
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, make_student(), data.dataset, [teacher])
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in {info.value}"


def test_unknown_trainable_group_lists_the_students_groups(tmp_path, data, make_student) -> None:
    cfg = recipe(tmp_path / "run", [{"steps": 1, "losses": ["clip"], "trainable": ["image", "audio"]}], teacher=False)
    msg = "stages.0.trainable: ['audio'] are not parameter groups of a dual_encoder student; "
    msg += "it has ['image', 'scale', 'text']"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        Trainer(cfg, make_student(), data.dataset)
    assert not (tmp_path / "run").exists()


def test_non_numeric_loss_weight(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"stages\.0\.losses\.0\.weight = 'high': expected a number"):
        recipe(tmp_path, [{"losses": [{"name": "clip", "weight": "high"}]}])


def test_duplicate_loss_labels(tmp_path, data, teacher, make_student) -> None:
    stages = [{"steps": 1, "losses": [{"name": "fd", "tower": "image"}, {"name": "fd", "tower": "image"}]}]
    with pytest.raises(ConfigError, match=r"stages\.0: several loss terms are labelled \['fd_image'\]"):
        Trainer(recipe(tmp_path, stages), make_student(), data.dataset, [teacher])


def test_missing_caption_language_and_too_small_data(tmp_path, data, make_student) -> None:
    english = load_train_data(DataConfig(eval=None, languages=["en"], limit_train=8))
    with pytest.raises(ConfigError, match=r"data\.languages: the training data has no captions in \['zh'\]"):
        Trainer(recipe(tmp_path, teacher=False), make_student(), english.dataset)
    cfg = recipe(tmp_path, teacher=False, batch_size=N_TRAIN + 1)
    with pytest.raises(ValueError, match=rf"has {N_TRAIN} samples, fewer than train.batch_size = {N_TRAIN + 1}"):
        Trainer(cfg, make_student(), data.dataset).fit()


def test_runs_with_other_mixed_precision_can_follow_each_other_in_one_process():
    from vldistill.train.loop import _accelerator

    assert [_accelerator(mp).mixed_precision for mp in ("no", "bf16", "no")] == ["no", "bf16", "no"]
