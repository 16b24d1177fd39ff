"""Tests for vldistill.cache: a fp32 cache reproduces the live teacher's losses; caches of another teacher,
processor, dataset, augmentation or dtype are refused by name; missing rows are counted; an interrupted build is
never used and resumes from its last complete shard; several teachers share one cache; stored views are replayed on
the student; the CLI builds caches from a recipe or from --teacher/--data. Tiny ``test-clip`` models, 64 samples."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vldistill.cache as cache_mod
from helpers import assert_same_rows, read_metrics
from vldistill.batching import Collator, LiveTeachers, teacher_texts
from vldistill.cache import (
    FORMAT_VERSION,
    CachedTeachers,
    CacheError,
    apply_view,
    build_cache,
    build_recipe_cache,
    dataset_digests,
    dataset_fields,
    fingerprint,
    open_recipe_cache,
    read_manifest,
    sample_digest,
    sample_view,
    teacher_identity,
)
from vldistill.cache import read as cache_read
from vldistill.cache import writer as cache_writer
from vldistill.cli import main
from vldistill.config import CacheConfig, ConfigError, DataConfig, RecipeConfig, load_recipe
from vldistill.data.pairs import PairDataset, Sample
from vldistill.data.sources import LabelledData
from vldistill.data.tasks import ChoiceSample, TaskDataset, VQASample
from vldistill.models import Teacher, as_teacher, encode_batch
from vldistill.students import build_student, image_processor_for
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import fit_recipe, load_train_data, tokenizer_corpus
from vldistill.train.loop import StageSampler, Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

N_TRAIN = 64
LANGS = ["en", "zh"]
# fd (pooled image + token-level image: token features are cached), cross-lingual text and relational distillation
STAGES = [
    {
        "name": "distill",
        "steps": 4,
        "losses": [
            {"name": "fd", "tower": "image", "weight": 10},
            {"name": "fd", "tower": "image", "level": "token", "label": "fd_tokens"},
            {"name": "xling", "langs": ["zh"], "weight": 10},
            {"name": "crd", "weight": 0.5},
        ],
    }
]
SMALL = {"workers": 0, "batch_size": 8, "shard_rows": 16}


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data() -> LabelledData:
    return load_train_data(DataConfig(train="bundled:easyvqa", eval=None, languages=LANGS, limit_train=N_TRAIN))


@pytest.fixture(scope="module")
def tokenizer(data: LabelledData):
    return train_wordpiece(tokenizer_corpus(data, LANGS), vocab_size=300)


def make_teacher(tokenizer, seed: int = 123, **overrides) -> Teacher:
    """A frozen CLIP wider than the student (48-wide towers, 24-d embeddings vs 32 and 16)."""
    torch.manual_seed(seed)
    widths = {f"{tower}.{key}": size for tower in ("vision", "text") for key, size in (("hidden_size", 48),)}
    return as_teacher(build_student("test-clip", tokenizer, projection_dim=24, **widths, **overrides), ["en"])


@pytest.fixture(scope="module")
def teacher(tokenizer) -> Teacher:
    return make_teacher(tokenizer)


@pytest.fixture(scope="module")
def teacher_dir(teacher: Teacher, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(path)
    return path


def student(tokenizer):
    torch.manual_seed(0)
    return build_student("test-clip", tokenizer)


def recipe(output_dir: Path, cache: Path | None = None, teacher: str = "teacher", **options: Any) -> RecipeConfig:
    t = {"name_or_path": str(teacher), "languages": ["en"]}
    if cache is not None:
        t.update(source="cache", cache=str(cache))
    return load_recipe(
        raw={
            "teacher": t,
            "student": {"preset": "test-clip"},
            "data": {"train": "bundled:easyvqa", "eval": None, "languages": LANGS, "limit_train": N_TRAIN},
            "stages": copy.deepcopy(STAGES),
            "cache": {**SMALL, **options},
            "train": {
                "batch_size": 8,
                "lr": 2e-3,
                "warmup_steps": 1,
                "log_every": 1,
                "progress": False,
                "tensorboard": False,
                "output_dir": str(output_dir),
            },
        }
    )


def subset(data: LabelledData, n: int) -> PairDataset:
    ds = data.dataset
    return PairDataset(ds.samples[:n], languages=ds.languages, preload=True, source=ds.source)


@pytest.fixture(scope="module")
def built(teacher: Teacher, data: LabelledData, tmp_path_factory) -> tuple[RecipeConfig, Path]:
    """A fp32 cache of ``teacher`` on the 64 samples (4 shards of 16 rows, token features included)."""
    directory = tmp_path_factory.mktemp("cache") / "c"
    cfg = recipe(tmp_path_factory.mktemp("run"), directory)
    summary = build_recipe_cache(cfg, [teacher], data.dataset, progress=False)
    assert summary["complete"] and summary["rows"] == N_TRAIN and summary["shards"] == 4
    return cfg, directory


# ------------------------------------------------------------------------------------------------- equivalence
def test_fp32_cache_gives_the_live_teachers_losses(tmp_path, tokenizer, teacher_dir, data):
    """Same recipe, teacher loaded from its directory: live vs built with `vldistill cache` and read back."""
    live = fit_recipe(
        recipe(tmp_path / "live", teacher=teacher_dir),
        student=student(tokenizer),
        train_data=data,
        evaluate_after=False,
    )
    cfg = recipe(tmp_path / "cached", tmp_path / "cache", teacher=teacher_dir)
    assert main(["cache", str(_write_yaml(tmp_path, cfg)), "--cache.workers", "0"]) == 0
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["complete"] and manifest["tokens"]  # fd_tokens needs them: stored without being asked
    assert manifest["teachers"][0]["files"] and manifest["vldistill"]
    cached = fit_recipe(cfg, student=student(tokenizer), train_data=data, evaluate_after=False)

    rows = read_metrics(live["output_dir"])
    assert len(rows) == 4 and {"fd_image", "fd_tokens", "xling", "crd", "loss"} <= set(rows[0])
    assert_same_rows(read_metrics(cached["output_dir"]), rows, rel=1e-4)
    a = load_file(Path(live["student_dir"]) / "model.safetensors")
    b = load_file(Path(cached["student_dir"]) / "model.safetensors")
    for name in a:
        if name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax is shift-invariant): Adam amplifies noise
            continue
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def _write_yaml(tmp_path: Path, cfg: RecipeConfig) -> Path:
    import yaml

    from vldistill.config import to_dict

    raw = to_dict(cfg)
    raw.pop("tiny")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cached_outputs_equal_the_live_teacher_on_a_batch(built, teacher, data):
    cfg, _ = built
    source = open_recipe_cache(cfg, data.dataset, [teacher])
    samples = [data.dataset[i] for i in (5, 0, 63, 17)]
    batch = Collator(teacher, [teacher], LANGS, [["en"]])(samples)
    needs = frozenset({"teacher", "image_tokens", "text_tokens"})
    live = encode_batch(teacher, batch["teachers"][0], needs)
    (cached,) = source(batch, needs)
    torch.testing.assert_close(cached.image, live.image)
    torch.testing.assert_close(cached.image_tokens, live.image_tokens)
    assert cached.text.keys() == live.text.keys() == {"en"}
    torch.testing.assert_close(cached.text["en"], live.text["en"])
    torch.testing.assert_close(cached.text_tokens["en"], live.text_tokens["en"])  # trimmed to the batch's longest
    assert torch.equal(cached.text_mask["en"], live.text_mask["en"])
    torch.testing.assert_close(cached.logit_scale, live.logit_scale)
    assert source.dims == (teacher.dims,)


# ------------------------------------------------------------------------------------------------ task samples
N_TASK = 12


def task_data(data: LabelledData, kind: str, change: dict[int, str] | None = None) -> TaskDataset:
    """12 VQA or multiple-choice items on the bundled images (4 candidates, 3 rationales); ``change``: item ->
    a new text for its second candidate."""
    pairs = data.dataset.samples[:N_TASK]
    items = []
    for i, pair in enumerate(pairs):
        where = {"image": pair.image, "data": pair.data, "id": str(i)}
        if kind == "vqa":
            items.append(VQASample(**where, question=f"what is shown {i}", answers=[pair.captions["en"]]))
            continue
        candidates = [pairs[(i + j) % N_TASK].captions["en"] for j in range(4)]
        if change and i in change:
            candidates[1] = change[i]
        rationales = ["its colour", "its shape", f"picture {i}"]
        items.append(
            ChoiceSample(
                **where,
                question="which caption fits",
                candidates=candidates,
                answer_index=0,
                rationales=rationales,
                rationale_index=2,
            )
        )
    return TaskDataset(items, preload=True, source=f"test:{kind}")


@pytest.mark.parametrize("kind", ["vqa", "multiple_choice"])
def test_a_cache_of_task_samples_gives_what_the_live_teacher_gives(kind, teacher, data, tmp_path):
    """One column per text field: ``[n, d]``, or ``[n, C, d]`` for candidates; read back as the live teacher gives
    them for a Collator batch (same fields, shapes and float32 values; token features only for plain fields)."""
    ds, directory = task_data(data, kind), tmp_path / "c"
    fields = {"vqa": ["question", "qa"], "multiple_choice": ["question", "candidates", "rationales"]}[kind]
    assert dataset_fields(ds) == fields and dataset_fields(data.dataset) is None
    cfg = recipe(tmp_path, directory)  # fd_tokens: token features are cached
    summary = build_recipe_cache(cfg, [teacher], ds, progress=False)
    assert summary["complete"] and summary["rows"] == N_TASK
    manifest = read_manifest(directory)
    assert manifest["format_version"] == FORMAT_VERSION == 2 and manifest["tokens"]
    assert manifest["dataset"]["fields"] == sorted(fields) and manifest["teachers"][0]["fields"] == fields
    shard = cache_read._Shard(directory / "shard-00000.safetensors", manifest["shards"][0]["bytes"])
    d = teacher.dims.embed
    assert shard.columns["t0.text.question"][2] == (N_TASK, d)  # one shard of 12 rows
    if kind == "vqa":
        assert shard.columns["t0.text.qa"][2] == (N_TASK, d) and "t0.text_tokens.qa" in shard.columns
    else:
        assert shard.columns["t0.text.candidates"][2] == (N_TASK, 4, d)
        assert shard.columns["t0.text.rationales"][2] == (N_TASK, 3, d)
        assert "t0.text_tokens.candidates" not in shard.columns and "t0.text_tokens.question" in shard.columns

    source = open_recipe_cache(cfg, ds, [teacher])
    batch = Collator(teacher, [teacher], [], [fields])([ds[i] for i in (5, 0, 11, 3)])
    needs = frozenset({"teacher", "image_tokens", "text_tokens"})
    (live,) = LiveTeachers([teacher])(batch, needs)
    (cached,) = source(batch, needs)
    assert cached.text.keys() == live.text.keys() == set(fields)
    for name in fields:
        assert cached.text[name].shape == live.text[name].shape and cached.text[name].dtype == torch.float32
        torch.testing.assert_close(cached.text[name], live.text[name])
    assert cached.text_tokens.keys() == live.text_tokens.keys() == {f for f in fields if f in ("question", "qa")}
    for name in live.text_tokens:
        torch.testing.assert_close(cached.text_tokens[name], live.text_tokens[name])
        assert torch.equal(cached.text_mask[name], live.text_mask[name])
    torch.testing.assert_close(cached.image, live.image)
    torch.testing.assert_close(cached.image_tokens, live.image_tokens)


def test_a_changed_candidate_is_refused_by_the_fingerprint(teacher, data, tmp_path):
    ds, directory = task_data(data, "multiple_choice"), tmp_path / "c"
    fields = dataset_fields(ds)
    build_cache(directory, [teacher], ds, [fields], options=CacheConfig(**SMALL), progress=False)
    one = task_data(data, "multiple_choice", change={3: "a purple hexagon"})
    # the texts are hashed through teacher_texts: records and item dicts give the same texts
    assert teacher_texts(one.samples[3]) == teacher_texts(one[3]) != teacher_texts(ds[3])
    assert fingerprint(dataset_digests(one, fields)) != read_manifest(directory)["dataset"]["fingerprint"]
    items = [[d[i] for i in range(N_TASK)] for d in (ds, one)]  # raw item dicts (their decoded pixels are hashed)
    a, b = (dataset_digests(x, fields) for x in items)
    assert [i for i in range(N_TASK) if (a[i] != b[i]).any()] == [3]
    identity = [teacher_identity(teacher)]
    with pytest.raises(CacheError, match=r"^dataset: the cache lacks rows for 1 of the 12 training samples"):
        CachedTeachers(directory, one, identity, [fields], CacheConfig(**SMALL))
    every = task_data(data, "multiple_choice", change={i: "a purple hexagon" for i in range(N_TASK)})
    with pytest.raises(CacheError, match=r"^dataset: the cache was built on another dataset .*none of the 12"):
        CachedTeachers(directory, every, identity, [fields], CacheConfig(**SMALL))
    CachedTeachers(directory, ds, identity, [fields], CacheConfig(**SMALL))  # the very data: served
    with pytest.raises(
        CacheError, match=r"^teachers\.0\.fields: the run needs text embeddings of the text fields \['qa'\]"
    ):
        CachedTeachers(directory, ds, identity, [["question", "qa"]], CacheConfig(**SMALL))


def test_a_cache_of_the_old_format_is_refused_until_rebuilt(teacher, data, tmp_path):
    ds, directory = subset(data, 16), tmp_path / "c"
    cfg = recipe(tmp_path, directory)
    build_recipe_cache(cfg, [teacher], ds, progress=False)
    path = directory / "manifest.json"
    old = json.loads(path.read_text())
    old["format_version"] = 1  # as vldistill wrote it before text fields
    path.write_text(json.dumps(old))
    refused = (
        r"format_version: the cache at .* was written by an older vldistill \(cache format 1; .* reads format 2\); "
        r"rebuild it: `vldistill cache \.\.\. --rebuild`"
    )
    with pytest.raises(CacheError, match=refused):
        open_recipe_cache(cfg, ds, [teacher])
    with pytest.raises(CacheError, match=refused):
        build_recipe_cache(cfg, [teacher], ds, progress=False)
    summary = build_recipe_cache(cfg, [teacher], ds, rebuild=True, progress=False)
    assert summary["complete"] and summary["built_rows"] == 16 and read_manifest(directory)["format_version"] == 2
    open_recipe_cache(cfg, ds, [teacher])


# ---------------------------------------------------------------------------------------------------- refusals
def test_another_teacher_is_refused_by_its_weights(built, tokenizer, data):
    cfg, _ = built
    with pytest.raises(CacheError, match=r"teachers\.0\.weights"):
        open_recipe_cache(cfg, data.dataset, [make_teacher(tokenizer, seed=7)])


def test_another_processor_is_refused(built, teacher, data):
    cfg, _ = built
    other = as_teacher(teacher, ["en"])
    other.image_processor = image_processor_for(24)  # same weights, other image size
    with pytest.raises(CacheError, match=r"teachers\.0\.processor"):
        open_recipe_cache(cfg, data.dataset, [other])


def test_another_dataset_is_refused(built, teacher, data):
    cfg, _ = built
    ds = data.dataset
    samples = [Sample(s.image, {**s.captions, "en": s.captions["en"] + " today"}, s.label) for s in ds.samples]
    with pytest.raises(CacheError, match=r"^dataset: the cache was built on another dataset .*none of the 64"):
        open_recipe_cache(cfg, PairDataset(samples, languages=LANGS, preload=True), [teacher])


def test_missing_rows_are_refused_with_their_count(teacher, data, tmp_path):
    cfg = recipe(tmp_path, tmp_path / "c")
    build_recipe_cache(cfg, [teacher], subset(data, 48), progress=False)
    with pytest.raises(CacheError, match=r"^dataset: the cache lacks rows for 16 of the 64 training samples"):
        open_recipe_cache(cfg, data.dataset, [teacher])


def test_a_subset_or_reordering_of_the_cached_data_is_served(built, teacher, data):
    cfg, _ = built
    ds = data.dataset
    order = [40, 3, 22, 9, 63, 0]
    reordered = PairDataset([ds.samples[i] for i in order], languages=LANGS, preload=True)
    source = open_recipe_cache(cfg, reordered, [teacher])
    batch = Collator(teacher, [teacher], LANGS, [["en"]])([reordered[i] for i in range(len(order))])
    (cached,) = source(batch, frozenset({"teacher"}))
    torch.testing.assert_close(cached.image, encode_batch(teacher, batch["teachers"][0], frozenset()).image)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"views": 2}, r"augmentation\.views"), ({"dtype": "float16"}, r"^dtype")],
    ids=["augmentation", "dtype"],
)
def test_other_augmentation_or_dtype_settings_are_refused(built, teacher, data, options, field):
    cfg, directory = built
    other = recipe(Path(cfg.train.output_dir), directory, **options)
    with pytest.raises(CacheError, match=field):
        open_recipe_cache(other, data.dataset, [teacher])


def test_other_augmentation_seed_is_refused(teacher, data, tmp_path):
    cfg = recipe(tmp_path, tmp_path / "c", views=2, seed=1)
    build_recipe_cache(cfg, [teacher], subset(data, 16), progress=False)
    with pytest.raises(CacheError, match=r"augmentation\.seed"):
        open_recipe_cache(recipe(tmp_path, tmp_path / "c", views=2, seed=2), subset(data, 16), [teacher])


def test_missing_languages_and_token_features_are_refused(built, teacher, data, tmp_path):
    cfg, directory = built
    identity = [teacher_identity(teacher, "teacher")]
    with pytest.raises(CacheError, match=r"teachers\.0\.languages.*\['zh'\]"):
        CachedTeachers(directory, data.dataset, identity, [["en", "zh"]], cfg.cache)
    plain = recipe(tmp_path, tmp_path / "plain")
    plain.stages[0].losses = plain.stages[0].losses[:1]
    build_recipe_cache(plain, [teacher], subset(data, 16), progress=False)
    source = open_recipe_cache(plain, subset(data, 16), [teacher])
    assert not read_manifest(tmp_path / "plain")["tokens"]
    with pytest.raises(CacheError, match=r"stages\.0: a loss needs \['image_tokens'\].*cache\.tokens: true"):
        Trainer(recipe(tmp_path, tmp_path / "plain"), student(teacher.tokenizer), subset(data, 16), [], source)


def test_a_recipe_cannot_mix_live_and_cached_teachers():
    with pytest.raises(ConfigError, match=r"teachers\.1\.source = 'live'"):
        load_recipe(raw={"teachers": [{"source": "cache", "cache": "c"}, {"source": "live"}]})
    with pytest.raises(ConfigError, match=r"teachers\.0\.cache = None"):
        load_recipe(raw={"teacher": {"source": "cache"}})


# ---------------------------------------------------------------------------------------- interrupted builds
class Killed(Exception):
    """Stands in for a killed build."""


def test_an_interrupted_build_is_never_used_and_resumes_from_its_last_complete_shard(
    teacher, data, tmp_path, monkeypatch
):
    ds = subset(data, 48)  # 3 shards of 16 rows, 2 batches of 8 each
    cfg = recipe(tmp_path, tmp_path / "c")
    cfg.stages[0].losses = cfg.stages[0].losses[:1]
    calls = []
    forward = teacher.encode_image

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the first batch of the third shard
            raise Killed
        return forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "encode_image", crashing)
    with pytest.raises(Killed):
        build_recipe_cache(cfg, [teacher], ds, progress=False)
    manifest = read_manifest(tmp_path / "c")
    assert not manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [16, 16]
    with pytest.raises(CacheError, match=r"incomplete \(2 shards of 3 written"):
        open_recipe_cache(cfg, ds, [teacher])
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard-*")}

    calls.clear()
    monkeypatch.setattr(teacher, "encode_image", lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
    summary = build_recipe_cache(cfg, [teacher], ds, progress=False)
    assert summary["complete"] and summary["built_rows"] == 16
    assert len(calls) == 2  # only the third shard's two batches were computed
    assert all((tmp_path / "c" / name).stat().st_mtime_ns == t for name, t in before.items())

    calls.clear()
    assert build_recipe_cache(cfg, [teacher], ds, progress=False)["built_rows"] == 0  # complete: reused as is
    assert not calls
    monkeypatch.undo()
    # the resumed cache is the same as one built in one go
    whole = recipe(tmp_path, tmp_path / "whole")
    whole.stages[0].losses = whole.stages[0].losses[:1]
    build_recipe_cache(whole, [teacher], ds, progress=False)
    batch = Collator(teacher, [], LANGS, [])([ds[i] for i in range(0, 48, 5)])
    a = open_recipe_cache(cfg, ds, [teacher])(batch, frozenset({"teacher"}))[0]
    b = open_recipe_cache(whole, ds, [teacher])(batch, frozenset({"teacher"}))[0]
    assert torch.equal(a.image, b.image) and torch.equal(a.text["en"], b.text["en"])


def test_a_cache_of_other_settings_is_not_overwritten_unless_asked(built, teacher, data, tmp_path):
    cfg, directory = built
    copy_dir = tmp_path / "c"
    shutil.copytree(directory, copy_dir)
    other = recipe(tmp_path, copy_dir, dtype="bfloat16")
    with pytest.raises(CacheError, match=r"other settings \(dtype: 'float32' there, 'bfloat16' now\)"):
        build_recipe_cache(other, [teacher], data.dataset, progress=False)
    summary = build_recipe_cache(other, [teacher], data.dataset, rebuild=True, progress=False)
    assert summary["complete"] and read_manifest(copy_dir)["dtype"] == "bfloat16"
    # bf16 storage: read back in the teacher's dtype, close to fp32
    samples = [data.dataset[i] for i in range(8)]
    batch = Collator(teacher, [], LANGS, [])(samples)
    low = open_recipe_cache(other, data.dataset, [teacher])(batch, frozenset({"teacher"}))[0]
    full = open_recipe_cache(cfg, data.dataset, [teacher])(batch, frozenset({"teacher"}))[0]
    assert low.image.dtype == torch.float32
    torch.testing.assert_close(low.image, full.image, rtol=1e-2, atol=1e-2)
    assert not torch.equal(low.image, full.image)


# ---------------------------------------------------------------------------------------------- several teachers
def test_several_teachers_share_one_cache(tokenizer, teacher, data, tmp_path):
    torch.manual_seed(1)
    narrow = as_teacher(build_student("test-clip", tokenizer, projection_dim=12), ["en", "zh"])
    teachers = [teacher, narrow]
    ds = subset(data, 32)
    cfg = recipe(tmp_path, tmp_path / "c")
    cfg.teachers.append(copy.deepcopy(cfg.teachers[0]))
    cfg.teachers[1].name_or_path, cfg.teachers[1].languages = "narrow", ["en", "zh"]
    build_recipe_cache(cfg, teachers, ds, progress=False)
    shard = cache_read._Shard(
        tmp_path / "c" / "shard-00000.safetensors", read_manifest(tmp_path / "c")["shards"][0]["bytes"]
    )
    assert {"t0.image", "t0.text.en", "t1.image", "t1.text.en", "t1.text.zh"} <= set(shard.columns)
    assert "t0.text.zh" not in shard.columns  # an English-only teacher never sees Chinese
    source = open_recipe_cache(cfg, ds, teachers)
    batch = Collator(teacher, teachers, LANGS, [["en"], ["en", "zh"]])([ds[i] for i in range(8)])
    outs = source(batch, frozenset({"teacher"}))
    for t, inputs, out in zip(teachers, batch["teachers"], outs, strict=True):
        live = encode_batch(t, inputs, frozenset({"teacher"}))
        torch.testing.assert_close(out.image, live.image)
        assert out.text.keys() == live.text.keys()
        for lang in live.text:
            torch.testing.assert_close(out.text[lang], live.text[lang])
    assert source.dims == (teacher.dims, narrow.dims)
    result = Trainer(cfg, student(tokenizer), ds, teacher_source=source).fit()  # no teacher loaded at all
    assert {"fd_image/t0", "fd_image/t1"} <= set(result.history[-1])


def _two_teacher_recipe(tmp_path: Path, directory: Path, order=("teacher", "narrow")) -> RecipeConfig:
    cfg = recipe(tmp_path, directory)
    first = cfg.teachers[0]
    cfg.teachers = []
    for name in order:
        t = copy.deepcopy(first)
        t.name_or_path, t.languages = name, ["en", "zh"]
        cfg.teachers.append(t)
    return cfg


def _narrow(tokenizer, languages=("en", "zh")) -> Teacher:
    torch.manual_seed(1)
    return as_teacher(build_student("test-clip", tokenizer, projection_dim=12), list(languages))


def _assert_serves_live_outputs(cfg, teachers, ds) -> None:
    source = open_recipe_cache(cfg, ds, teachers)
    batch = Collator(teachers[0], teachers, LANGS, [t.languages for t in teachers])(
        [ds[i] for i in range(0, len(ds), 3)]
    )
    for t, inputs, out in zip(teachers, batch["teachers"], source(batch, frozenset({"teacher"})), strict=True):
        live = encode_batch(t, inputs, frozenset({"teacher"}))
        torch.testing.assert_close(out.image, live.image)
        assert out.text.keys() == live.text.keys()
        for lang in live.text:
            torch.testing.assert_close(out.text[lang], live.text[lang])
    assert source.dims == tuple(t.dims for t in teachers)


@pytest.fixture
def bilingual(teacher) -> Teacher:
    """The cached teacher reading English and Chinese captions: its cache fingerprints both."""
    return as_teacher(teacher, ["en", "zh"])


def test_a_teacher_is_added_to_a_complete_cache_without_running_the_cached_one(
    tokenizer, bilingual, data, tmp_path, monkeypatch
):
    ds, directory, narrow = subset(data, 32), tmp_path / "c", _narrow(tokenizer)
    build_recipe_cache(recipe(tmp_path, directory), [bilingual], ds, progress=False)
    before = load_file(directory / "shard-00001.safetensors")

    ran = []
    real = cache_writer.encode_batch
    monkeypatch.setattr(cache_writer, "encode_batch", lambda t, *a, **k: ran.append(t) or real(t, *a, **k))
    cfg = _two_teacher_recipe(tmp_path, directory, order=("narrow", "teacher"))  # any order: matched by identity
    cfg.teachers.insert(1, copy.deepcopy(cfg.teachers[0]))  # the same new teacher twice: added once
    summary = build_recipe_cache(cfg, [narrow, narrow, bilingual], ds, progress=False)
    assert ran and all(t is narrow for t in ran)  # only the new teacher ran
    assert summary["complete"] and summary["built_rows"] == 32 and summary["teachers"] == ["teacher", "narrow"]
    after = load_file(directory / "shard-00001.safetensors")
    for name, value in before.items():  # the cached teacher's columns (and the row digests) are kept as they were
        assert torch.equal(after[name], value), name
    assert {"t1.image", "t1.text.en", "t1.text.zh", "t1.image_tokens"} <= set(after)
    assert "extending" not in read_manifest(directory)

    _assert_serves_live_outputs(cfg, [narrow, narrow, bilingual], ds)
    _assert_serves_live_outputs(_two_teacher_recipe(tmp_path, directory), [bilingual, narrow], ds)
    again = build_recipe_cache(_two_teacher_recipe(tmp_path, directory), [bilingual, narrow], ds, progress=False)
    assert again["built_rows"] == 0  # it holds both: reused


def test_a_teacher_reading_captions_the_cache_does_not_fingerprint_is_not_added(tokenizer, teacher, data, tmp_path):
    """The row digests (the cache's identity) cover the cached teachers' languages; they never change."""
    ds, directory = subset(data, 16), tmp_path / "c"
    build_recipe_cache(recipe(tmp_path, directory), [teacher], ds, progress=False)  # English only
    with pytest.raises(CacheError, match=r"teachers\.1\.languages: the teacher reads captions in \['zh'\], which the "):
        build_recipe_cache(_two_teacher_recipe(tmp_path, directory), [teacher, _narrow(tokenizer)], ds, progress=False)
    english = _narrow(tokenizer, ["en"])
    cfg = _two_teacher_recipe(tmp_path, directory)
    cfg.teachers[1].languages = ["en"]
    assert build_recipe_cache(cfg, [teacher, english], ds, progress=False)["built_rows"] == 16
    _assert_serves_live_outputs(cfg, [teacher, english], ds)


def test_a_teacher_added_to_a_cache_of_views_is_run_on_the_stored_views(tokenizer, bilingual, data, tmp_path):
    ds, directory, narrow = subset(data, 16), tmp_path / "c", _narrow(tokenizer)
    build_recipe_cache(recipe(tmp_path, directory, views=3), [bilingual], ds, progress=False)
    cfg = _two_teacher_recipe(tmp_path, directory)
    cfg.cache.views = 3
    build_recipe_cache(cfg, [bilingual, narrow], ds, progress=False)
    source = open_recipe_cache(cfg, ds, [bilingual, narrow])
    samples = [{**ds[i], "view": v} for i, v in ((4, 2), (7, 0), (11, 1))]
    batch = Collator(bilingual, [], LANGS, [], views=source.views)(samples)
    _, cached = source(batch, frozenset({"teacher"}))
    images = [apply_view(s["image"], source.views.params[s["index"], s["view"]]) for s in samples]
    torch.testing.assert_close(cached.image, narrow.encode_image(narrow.preprocess_images(images)))


def test_an_interrupted_addition_is_never_used_and_resumes(tokenizer, bilingual, data, tmp_path, monkeypatch):
    ds, directory, narrow = subset(data, 48), tmp_path / "c", _narrow(tokenizer)
    build_recipe_cache(recipe(tmp_path, directory), [bilingual], ds, progress=False)
    cfg = _two_teacher_recipe(tmp_path, directory)
    real = cache_writer._add_columns

    def killed_at_shard_1(directory, manifest, index, tensors):
        if index == 1:
            raise KeyboardInterrupt
        real(directory, manifest, index, tensors)

    monkeypatch.setattr(cache_writer, "_add_columns", killed_at_shard_1)
    with pytest.raises(KeyboardInterrupt):
        build_recipe_cache(cfg, [bilingual, narrow], ds, progress=False)
    monkeypatch.setattr(cache_writer, "_add_columns", real)
    manifest = read_manifest(directory)
    assert manifest["extending"]["from_teacher"] == 1 and not manifest["complete"]
    assert sorted(p.name for p in directory.glob("shard-*.json")) == ["shard-00000.json"]  # shard 0 rewritten
    with pytest.raises(CacheError, match=r"adding the teachers \['narrow'\] to it was interrupted"):
        open_recipe_cache(cfg, ds, [bilingual, narrow])
    with pytest.raises(CacheError, match=r"adding the teachers \['narrow'\] to this cache was interrupted; give"):
        build_recipe_cache(recipe(tmp_path, directory), [bilingual], ds, progress=False)
    elsewhere = tmp_path / "copy"
    shutil.copytree(directory, elsewhere)  # --rebuild, even with the manifest's own teachers, replaces it all
    again = _two_teacher_recipe(tmp_path, elsewhere)
    replaced = build_recipe_cache(again, [bilingual, narrow], ds, rebuild=True, progress=False)
    assert replaced["complete"] and replaced["built_rows"] == 48
    _assert_serves_live_outputs(again, [bilingual, narrow], ds)

    summary = build_recipe_cache(cfg, [bilingual, narrow], ds, progress=False)  # resumes the addition
    assert summary["complete"] and summary["built_rows"] == 32  # shards 1 and 2 of 16 rows
    _assert_serves_live_outputs(cfg, [bilingual, narrow], ds)


def test_rebuild_replaces_the_cached_teachers_instead_of_adding(tokenizer, teacher, data, tmp_path):
    ds, directory, narrow = subset(data, 16), tmp_path / "c", _narrow(tokenizer)
    build_recipe_cache(recipe(tmp_path, directory), [teacher], ds, progress=False)
    cfg = recipe(tmp_path, directory, teacher="narrow")
    cfg.teachers[0].languages = ["en", "zh"]
    summary = build_recipe_cache(cfg, [narrow], ds, rebuild=True, progress=False)
    assert summary["teachers"] == ["narrow"] and summary["built_rows"] == 16
    _assert_serves_live_outputs(cfg, [narrow], ds)


def test_a_teacher_the_cache_lacks_is_refused_with_what_it_holds(tokenizer, teacher, data, tmp_path):
    ds, directory = subset(data, 16), tmp_path / "c"
    build_recipe_cache(recipe(tmp_path, directory), [teacher], ds, progress=False)
    with pytest.raises(
        CacheError, match=r"teachers\.1\.weights: .*the cache holds \['teacher'\]; `vldistill cache` adds"
    ):
        open_recipe_cache(_two_teacher_recipe(tmp_path, directory), ds, [teacher, _narrow(tokenizer)])
    with pytest.raises(
        CacheError, match=r"teachers\.0\.languages: the run needs text embeddings in \['zh'\], the cache"
    ):
        open_recipe_cache(recipe(tmp_path, directory), ds, [as_teacher(teacher, ["en", "zh"])])


# ------------------------------------------------------------------------------------------- augmented views
def test_views_are_stored_and_replayed_on_teacher_and_student(tokenizer, teacher, data, tmp_path):
    ds = subset(data, 16)
    cfg = recipe(tmp_path, tmp_path / "c", views=3, crop_scale=[0.3, 0.8])
    cfg.stages[0].losses = cfg.stages[0].losses[:1]
    build_recipe_cache(cfg, [teacher], ds, progress=False)
    source = open_recipe_cache(cfg, ds, [teacher])
    params = source.views.params
    assert params.shape == (16, 3, 5) and source.views.count == 3
    aug = cache_mod.augmentation_settings(cfg.cache)
    digest = sample_digest(ds.samples[4], ["en"])
    assert params[4, 2].tolist() == np.float32(sample_view(digest, 2, aug)).tolist()  # the stored parameters
    assert len({tuple(p) for p in params.reshape(-1, 5).tolist()}) == 48  # all views differ

    # the teacher's cached output for (row, view) is the teacher on that view; the student gets the same view
    me = student(tokenizer)
    samples = [{**ds[i], "view": v} for i, v in ((4, 2), (7, 0), (4, 1))]
    batch = Collator(me, [], LANGS, [], views=source.views)(samples)
    assert batch["views"].tolist() == [2, 0, 1]
    (cached,) = source(batch, frozenset({"teacher"}))
    for j, s in enumerate(samples):
        image = apply_view(s["image"], params[s["index"], s["view"]])
        assert image.size != s["image"].size
        expected = teacher.encode_image(teacher.preprocess_images([image]))
        torch.testing.assert_close(cached.image[j : j + 1], expected)
        torch.testing.assert_close(batch["student"]["pixel_values"][j : j + 1], me.preprocess_images([image]))
    # training reads the views the sampler chose
    result = Trainer(cfg, me, ds, teacher_source=source).fit()
    assert all(np.isfinite(v) for v in result.history[-1].values() if isinstance(v, float))


def test_the_sampler_uses_every_view_once_per_k_epochs():
    sampler = StageSampler(12, 4, seed=0, stage=0, total=9, views=3)  # 3 epochs of 3 batches
    seen: dict[int, list[int]] = {}
    for batch in sampler:
        for index, view in batch:
            seen.setdefault(index, []).append(view)
    assert all(sorted(views) == [0, 1, 2] for views in seen.values()) and len(seen) == 12
    assert list(StageSampler(12, 4, 0, 0, 9, start=4, views=3)) == list(sampler)[4:]  # resumable


def test_apply_view_crops_and_flips():
    from PIL import Image

    image = Image.new("RGB", (10, 20))
    image.putpixel((0, 0), (255, 0, 0))
    out = apply_view(image, [0.0, 0.0, 0.5, 0.5, 1.0])
    assert out.size == (5, 10) and out.getpixel((4, 0)) == (255, 0, 0)
    assert apply_view(image, [0.0, 0.0, 1.0, 1.0, 0.0]).tobytes() == image.tobytes()


# --------------------------------------------------------------------------------------------------- identity
def test_sample_digest_hashes_content_not_paths(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"\x89PNG same bytes")
    shutil.copy(a, b)
    captions = {"en": "a red circle", "zh": "红色的圆"}
    assert sample_digest(Sample(str(a), captions), ["en"]) == sample_digest(Sample(str(b), captions), ["en"])
    assert sample_digest(Sample(str(a), captions), ["en"]) != sample_digest(Sample(str(a), captions), ["en", "zh"])
    b.write_bytes(b"\x89PNG other bytes")
    assert sample_digest(Sample(str(a), captions), ["en"]) != sample_digest(Sample(str(b), captions), ["en"])


def test_identity_from_a_directory_matches_the_loaded_teacher(teacher, teacher_dir):
    from vldistill.models import load_teacher

    loaded = teacher_identity(load_teacher(teacher_dir), str(teacher_dir))
    unloaded = teacher_identity(None, str(teacher_dir))
    assert loaded["processor"] == unloaded["processor"] == teacher_identity(teacher)["processor"]
    assert loaded["files"] == unloaded["files"] and loaded["files"]
    assert loaded["weights"] == teacher_identity(teacher)["weights"] and unloaded["weights"] is None


def test_reading_a_batch_maps_nothing_and_keeps_few_files_open(built, teacher, data, monkeypatch):
    cfg, _ = built
    source = open_recipe_cache(cfg, data.dataset, [teacher])
    monkeypatch.setattr(cache_read, "OPEN_FILES", 2)
    need = frozenset({"teacher", "image_tokens"})
    rows = torch.tensor([40, 0, 17, 17, 63, 1, 2])  # four shards, out of order, one row twice, a run of three
    out = source({"index": rows}, need)[0]
    batch = Collator(teacher, [teacher], LANGS, [["en"]])([data.dataset[i] for i in rows.tolist()])
    live = encode_batch(teacher, batch["teachers"][0], need)
    assert torch.allclose(out.image, live.image, atol=1e-5)
    assert torch.allclose(out.image_tokens, live.image_tokens, atol=1e-5)
    assert torch.equal(out.image[2], out.image[3])  # the same row twice
    maps = Path("/proc/self/maps")
    if maps.is_file():  # no shard file is memory-mapped by training reads
        assert "shard-" not in maps.read_text()
    assert len(source._fds) <= 2
    source.close()
    assert not source._fds


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_cache_from_teacher_and_data(teacher_dir, tmp_path, capsys):
    out = tmp_path / "c"
    args = ["cache", "--teacher", str(teacher_dir), "--data", "bundled:easyvqa", "--limit", "16", "--output", str(out)]
    assert main([*args, "--workers", "0", "--dtype", "float16", "--views", "2", "--tokens"]) == 0  # auto shard size
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 16 and summary["complete"] and summary["use_with"]["teacher.cache"] == str(out)
    manifest = read_manifest(out)
    assert manifest["dtype"] == "float16" and manifest["augmentation"]["views"] == 2 and manifest["tokens"]
    assert manifest["shard_rows"] > 16 and len(manifest["shards"]) == 1
    assert manifest["dataset"]["fields"] == ["en"] and manifest["teachers"][0]["id"] == str(teacher_dir.resolve())
    assert main(["cache", "--data", "bundled:easyvqa", "--output", str(out)]) == 2
    assert "--teacher and --data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "--help"])
    assert exit_info.value.code == 0 and "usage: vldistill cache" in capsys.readouterr().out


def test_cli_cache_on_several_processes_needs_the_launchers_rendezvous(teacher_dir, tmp_path, capsys, monkeypatch):
    # vldistill cache runs on several processes (tests/test_distributed_cache.py); without the launcher's
    # rendezvous variables it says what is missing and writes nothing
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "c"
    args = ["cache", "--teacher", str(teacher_dir), "--data", "bundled:easyvqa", "--limit", "16", "--output", str(out)]
    assert main(args) == 2
    assert "RANK" in capsys.readouterr().err
    assert not out.exists()


def test_build_cache_needs_one_identity_per_teacher(teacher, data, tmp_path):
    with pytest.raises(ValueError, match="one identity"):
        build_cache(tmp_path, [teacher], subset(data, 8), [["en"]], identities=[], options=CacheConfig(workers=0))
