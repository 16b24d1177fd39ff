"""Low-shot and domain-shift splits: sizes, seeds, and that no held-out item ever reaches training."""

from __future__ import annotations

import dataclasses
import json
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from PIL import Image

from vldistill.data import (
    DataError,
    SplitConfig,
    TaskDataset,
    apply_split,
    domain_shift,
    load_data,
    load_task_manifest,
    low_shot,
)
from vldistill.data import easyvqa_tasks as evt


def combo(sample) -> str:
    return f"{sample.attributes['color']} {sample.attributes['shape']}"


def held(sample, patterns) -> bool:
    return any(fnmatchcase(sample.text.lower(), p.lower()) for p in patterns)


@pytest.fixture(scope="module")
def vqa() -> tuple[TaskDataset, TaskDataset]:
    return evt.easyvqa_vqa("train", limit=6000), evt.easyvqa_vqa("test", limit=3000)


# ---------------------------------------------------------------------------------------------------------------
# Low-shot


def test_low_shot_sizes_and_seeds(vqa) -> None:
    train, _ = vqa
    ten = low_shot(train, 0.1, seed=0)
    assert len(ten) == 600 and ten.answers == train.answers
    again = low_shot(train, 0.1, seed=0)
    assert [s.id for s in again.samples] == [s.id for s in ten.samples]
    other = low_shot(train, 0.1, seed=1)
    assert [s.id for s in other.samples] != [s.id for s in ten.samples]
    ids = [s.id for s in train.samples]
    assert [ids.index(s.id) for s in ten.samples] == sorted(ids.index(s.id) for s in ten.samples)  # original order
    one = low_shot(train, 0.01, seed=0)
    assert len(one) == 60 and {s.id for s in one.samples} <= {s.id for s in ten.samples}  # nested draws
    assert len(low_shot(train, 1e-6, seed=0)) == 1 and len(low_shot(train, 1, seed=0)) == len(train)
    assert ten[0]["answer_index"] == train.answers.index(ten[0]["answer"])


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, True, "0.1", None])
def test_low_shot_rejects_bad_fractions(vqa, fraction) -> None:
    with pytest.raises(ValueError, match=rf"low_shot fraction = {fraction!r}: must be a number in \(0, 1\]"):
        low_shot(vqa[0], fraction, seed=0)


def test_low_shot_on_image_caption_pairs() -> None:
    pairs = load_data("bundled:easyvqa", split="test", limit=40).dataset
    part = low_shot(pairs, 0.25, seed=2)
    assert len(part) == 10 and part.languages == pairs.languages
    assert [s.image for s in part.samples] == [s.image for s in low_shot(pairs, 0.25, seed=2).samples]
    assert {s.image for s in part.samples} <= {s.image for s in pairs.samples}
    assert part[0]["captions"] == pairs[[s.image for s in pairs.samples].index(part.samples[0].image)]["captions"]


# ---------------------------------------------------------------------------------------------------------------
# Domain shift


def test_combos_never_reach_training(vqa) -> None:
    train, test = vqa
    held_out = set(evt.HELD_OUT_COMBOS)
    shifted_train, shifted_test = domain_shift(train, test, by="combos")
    assert not {combo(s) for s in shifted_train.samples} & held_out
    assert {combo(s) for s in shifted_test.samples} == held_out
    assert len(shifted_train) == sum(combo(s) not in held_out for s in train.samples)
    assert len(shifted_test) == sum(combo(s) in held_out for s in test.samples)
    assert 0.08 < len(shifted_test) / len(test) < 0.3  # neither tiny nor most of the test set
    # Every colour and shape of the held-out combinations is still seen in training, with other partners.
    seen = {v for s in shifted_train.samples for v in s.attributes.values()}
    assert {w for c in held_out for w in c.split()} <= seen
    assert {s.question_type for s in shifted_test.samples} == {"yes_no", "colour", "shape"}


def test_phrasings_never_reach_training(vqa) -> None:
    train, test = vqa
    patterns = evt.HELD_OUT_PHRASINGS["vqa"]
    shifted_train, shifted_test = domain_shift(train, test, by="phrasings")
    assert not any(held(s, patterns) for s in shifted_train.samples)
    assert all(held(s, patterns) for s in shifted_test.samples)
    assert len(shifted_train) + sum(held(s, patterns) for s in train.samples) == len(train)
    assert 0.1 < len(shifted_test) / len(test) < 0.4
    # The question forms stay in training under other phrasings: every question type is trained and tested.
    assert {s.question_type for s in shifted_test.samples} == {s.question_type for s in shifted_train.samples}


@pytest.mark.parametrize("make", [evt.easyvqa_entailment, evt.easyvqa_mc])
def test_default_phrasings_for_entailment_and_choice(make) -> None:
    train, test = make("train", limit=600), make("test", limit=600)
    patterns = evt.HELD_OUT_PHRASINGS[train.kind]
    shifted_train, shifted_test = domain_shift(train, test, by="phrasings")
    assert not any(held(s, patterns) for s in shifted_train.samples)
    assert all(held(s, patterns) for s in shifted_test.samples) and len(shifted_test) >= 60
    if train.kind == "entailment":
        assert {s.label for s in shifted_test.samples} == {0, 1, 2}


def test_custom_hold_out_on_a_manifest_with_attributes(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "x.png")
    attrs = [{"color": "red", "size": "big"}, {"color": "red", "size": "small"}, {"color": "big", "size": "small"}]
    rows = [{"image": "x.png", "hypothesis": f"h{i}", "label": 0, "attributes": a} for i, a in enumerate(attrs)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_task_manifest(path, "entailment")
    train, test = domain_shift(ds, ds, by="combos", hold_out=["size=big"])
    assert [s.hypothesis for s in train.samples] == ["h1", "h2"] and [s.hypothesis for s in test.samples] == ["h0"]
    train, test = domain_shift(ds, ds, by="combos", hold_out=["big"])  # a bare value matches any attribute
    assert [s.hypothesis for s in train.samples] == ["h1"] and [s.hypothesis for s in test.samples] == ["h0", "h2"]
    train, test = domain_shift(ds, ds, by="phrasings", hold_out=["H2"])
    assert [s.hypothesis for s in test.samples] == ["h2"]
    train, none = domain_shift(ds, None, by="combos", hold_out=["red small"])
    assert [s.hypothesis for s in train.samples] == ["h0", "h2"] and none is None


def test_domain_shift_errors(tmp_path: Path, vqa) -> None:
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "x.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "question": "q?", "answer": "a"}) + "\n")
    plain = load_task_manifest(tmp_path / "m.jsonl", "vqa")
    with pytest.raises(DataError, match=r"m\.jsonl row 1: no attributes; a domain shift by combos needs them"):
        domain_shift(plain, plain, by="combos")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no test item matches the phrasings hold-out"):
        domain_shift(plain, plain, by="phrasings")
    train, test = vqa
    with pytest.warns(UserWarning, match=r"hold-out \['purple circle'\] matches no item"):
        domain_shift(train, test, by="combos", hold_out=["red circle", "purple circle"])
    with pytest.raises(DataError, match="leaves no training item"):
        domain_shift(train, test, by="phrasings", hold_out=["*"])
    with pytest.raises(ValueError, match="domain_shift = 'types': must be one of combos, phrasings"):
        domain_shift(train, test, by="types")


# ---------------------------------------------------------------------------------------------------------------
# SplitConfig and apply_split


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low_shot": 0.0}, r"low_shot = 0\.0: must be a number in \(0, 1\]"),
        ({"low_shot": 2}, r"low_shot = 2: must be a number in \(0, 1\]"),
        ({"domain_shift": "questions"}, r"domain_shift = 'questions': must be one of combos, phrasings, or null"),
        ({"domain_shift": "combos", "hold_out": "red circle"}, r"hold_out = 'red circle': must be a list of strings"),
        ({"domain_shift": "combos", "hold_out": ["red circle", ""]}, r"hold_out = .*: every entry must be a non-emp"),
        ({"hold_out": ["red circle"]}, r"hold_out = \['red circle'\]: only used with domain_shift"),
        ({"seed": "1"}, r"seed = '1': must be an integer"),
    ],
)
def test_split_config_validation_names_field_value_and_allowed(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SplitConfig(**kwargs)


def test_split_config_is_frozen_and_apply_split_composes(vqa) -> None:
    train, test = vqa
    cfg = SplitConfig(low_shot=0.05, domain_shift="combos", hold_out=("red circle",), seed=3)
    assert cfg.hold_out == ["red circle"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]
    new_train, new_test = apply_split(cfg, train, test)
    shifted_train, shifted_test = domain_shift(train, test, by="combos", hold_out=["red circle"])
    assert [s.id for s in new_test.samples] == [s.id for s in shifted_test.samples]
    assert [s.id for s in new_train.samples] == [s.id for s in low_shot(shifted_train, 0.05, seed=3).samples]
    assert "red circle" not in {combo(s) for s in new_train.samples}
    assert apply_split(SplitConfig(), train, test) == (train, test)
    assert len(apply_split(SplitConfig(low_shot=0.5), train, None)[0]) == len(train) // 2
