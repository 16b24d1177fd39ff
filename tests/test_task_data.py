"""Task samples (VQA, visual entailment, multiple choice): manifests, Hugging Face datasets, and the bundled easy-VQA
data in each kind."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import datasets
import easy_vqa
import pytest
from PIL import Image

from vldistill.data import (
    ENTAILMENT_LABELS,
    DataError,
    EntailmentSample,
    LabelledData,
    TaskDataset,
    VQASample,
    load_data,
    load_task_data,
    load_task_hf,
    load_task_manifest,
)
from vldistill.data import easyvqa_tasks as evt
from vldistill.data.easyvqa import COLORS, SHAPES, image_labels

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
VQA_KEYS = {"index", "image", "kind", "question", "answers", "answer", "answer_index", "question_type"}
ENTAILMENT_KEYS = {"index", "image", "kind", "hypothesis", "label"}
CHOICE_KEYS = {"index", "image", "kind", "question", "candidates", "answer_index", "rationales", "rationale_index"}


def write_png(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Three tiny PNGs under tmp_path/imgs, plus a corrupt one."""
    paths = {name: write_png(tmp_path / "imgs" / f"{name}.png", c) for name, c in (("red", RED), ("green", GREEN))}
    paths["blue"] = write_png(tmp_path / "imgs" / "blue.png", BLUE)
    paths["corrupt"] = tmp_path / "imgs" / "corrupt.png"
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return paths


def vqa_rows() -> list[dict]:
    return [
        {"image": "imgs/red.png", "question": "What colour?", "answers": ["red", "crimson", "crimson", "red"]},
        {"image": "imgs/green.png", "question": " Is it green? ", "answer": "yes", "question_type": "yes_no"},
        {"image": "imgs/red.png", "question": "Is it green?", "answers": ["no"], "id": 7, "attributes": {"c": "red"}},
        {"image": "imgs/blue.png", "question": "What colour?", "answers": ["blue", "yes"]},
    ]


def entailment_rows() -> list[dict]:
    return [
        {"image": "imgs/red.png", "hypothesis": "The square is red.", "label": "entailment"},
        {"image": "imgs/red.png", "hypothesis": "It is made of wood.", "label": 1},
        {"image": "imgs/green.png", "hypothesis": "The square is red.", "label": "Contradiction"},
    ]


def choice_rows() -> list[dict]:
    return [
        {
            "image": "imgs/red.png",
            "question": "What colour is it?",
            "candidates": ["green", "red", "blue"],
            "answer": 1,
            "rationales": ["It is grass.", "It is filled with red.", "It is the sky."],
            "rationale": 1,
        },
        {"image": "imgs/blue.png", "question": "What colour?", "candidates": ["red", "green", "blue"], "answer": 2},
    ]


ROWS = {"vqa": vqa_rows, "entailment": entailment_rows, "multiple_choice": choice_rows}


# ---------------------------------------------------------------------------------------------------------------
# Manifests


def test_vqa_manifest_items_targets_and_vocabulary(tmp_path: Path, images) -> None:
    ds = load_task_manifest(write_jsonl(tmp_path / "vqa.jsonl", vqa_rows()), "vqa")
    assert ds.kind == "vqa" and len(ds) == 4 and ds.skipped == 0
    # Answer counts: crimson 2, red 2, yes 2, blue 1, no 1: by frequency, then alphabetically.
    assert ds.answers == ["crimson", "red", "yes", "blue", "no"]
    first = ds[0]
    assert set(first) == VQA_KEYS
    assert first["kind"] == "vqa" and first["index"] == 0 and first["question"] == "What colour?"
    assert first["answers"] == ["red", "crimson", "crimson", "red"]
    assert first["answer"] == "red"  # tie between red and crimson: red occurs first
    assert first["answer_index"] == 1 and first["question_type"] == "other"
    assert first["image"].getpixel((0, 0)) == RED
    second = ds[1]
    assert second["question"] == "Is it green?" and second["answers"] == ["yes"] and second["answer_index"] == 2
    assert second["question_type"] == "yes_no" and second["image"].getpixel((0, 0)) == GREEN
    assert ds[3]["answer"] == "blue"
    sample = ds.samples[2]
    assert isinstance(sample, VQASample)
    assert sample.image == str(images["red"]) and sample.id == "7" and sample.attributes == {"c": "red"}
    assert ds.samples[0].id == "1" and ds.samples[0].origin == f"{tmp_path / 'vqa.jsonl'} row 1"
    assert ds[-1]["index"] == 3 and "4 vqa samples, 5 answers" in repr(ds)


def test_eval_set_uses_the_training_vocabulary(tmp_path: Path, images) -> None:
    train = load_task_manifest(write_jsonl(tmp_path / "train.jsonl", vqa_rows()), "vqa")
    rows = [{"image": "imgs/red.png", "question": "Is it?", "answer": "no"}, *vqa_rows()[:1]]
    test = load_task_manifest(write_jsonl(tmp_path / "test.jsonl", rows), "vqa", answers=train.answers)
    assert test.answers == train.answers
    assert [item["answer_index"] for item in test] == [train.answers.index("no"), train.answers.index("red")]
    rows.append({"image": "imgs/red.png", "question": "What is it?", "answers": ["square", "red", "square"]})
    path = write_jsonl(tmp_path / "test2.jsonl", rows)
    with pytest.raises(DataError, match=r"test2\.jsonl row 3: answer 'square' is not in the answer vocabulary"):
        load_task_manifest(path, "vqa", answers=train.answers)
    kept = load_task_manifest(path, "vqa", answers=train.answers, skip_bad=True)
    assert len(kept) == 2 and kept.skipped == 1 and "skipped 1 bad samples of 3" in kept.summary()


def test_entailment_manifest_labels_by_name_or_index(tmp_path: Path, images) -> None:
    ds = load_task_manifest(write_jsonl(tmp_path / "ve.jsonl", entailment_rows()), "entailment")
    assert ENTAILMENT_LABELS == ("entailment", "neutral", "contradiction")
    assert [item["label"] for item in ds] == [0, 1, 2]
    assert set(ds[0]) == ENTAILMENT_KEYS and ds[0]["kind"] == "entailment"
    assert ds[2]["hypothesis"] == "The square is red." and ds[2]["image"].getpixel((1, 1)) == GREEN
    assert ds.answers == [] and isinstance(ds.samples[0], EntailmentSample)


def test_choice_manifest_with_and_without_rationales(tmp_path: Path, images) -> None:
    ds = load_task_manifest(write_jsonl(tmp_path / "mc.jsonl", choice_rows()), "multiple_choice")
    assert set(ds[0]) == CHOICE_KEYS and ds[0]["kind"] == "multiple_choice"
    assert ds[0]["candidates"] == ["green", "red", "blue"] and ds[0]["answer_index"] == 1
    assert ds[0]["rationales"][ds[0]["rationale_index"]] == "It is filled with red."
    assert ds[1]["rationales"] == [] and ds[1]["rationale_index"] == -1 and ds[1]["answer_index"] == 2


def test_image_root_resolves_relative_paths(tmp_path: Path, images) -> None:
    rows = [{"image": "red.png", "question": "q", "answer": "a"}]
    ds = load_task_manifest(write_jsonl(tmp_path / "m.jsonl", rows), "vqa", image_root=tmp_path / "imgs")
    assert ds.samples[0].image == str(images["red"])


def _vqa(**row) -> dict:
    return {"image": "imgs/red.png", "question": "What colour?", "answer": "red", **row}


def _ve(**row) -> dict:
    return {"image": "imgs/red.png", "hypothesis": "It is red.", "label": 0, **row}


def _mc(**row) -> dict:
    return {"image": "imgs/red.png", "question": "Which?", "candidates": ["a", "b", "c"], "answer": 0, **row}


@pytest.mark.parametrize(
    ("kind", "bad", "message"),
    [
        ("vqa", _vqa(image="imgs/missing.png"), r"image '.*missing\.png' not found"),
        ("vqa", _vqa(image="imgs/corrupt.png"), r"image '.*corrupt\.png' cannot be decoded"),
        ("vqa", _vqa(question="  "), r"empty question \(expected a non-empty string\)"),
        ("vqa", _vqa(answer=None), r"no answers \(expected 'answers': a list of strings, or 'answer': a string\)"),
        ("vqa", _vqa(answer=None, answers=[]), r"0 answers \(expected at least 1\)"),
        ("vqa", _vqa(answer=None, answers=["red", ""]), r"empty answers\[1\] \(expected a non-empty string\)"),
        ("vqa", _vqa(question=3), r"question is int 3 \(expected a string\)"),
        ("entailment", _ve(hypothesis=""), r"empty hypothesis \(expected a non-empty string\)"),
        ("entailment", _ve(label="maybe"), r"label 'maybe' is not an entailment label \(expected one of 'entailment'"),
        ("entailment", _ve(label=3), r"label 3 is out of range \(expected one of 'entailment', 'neutral', "),
        ("entailment", _ve(label=None), r"no label \(expected one of"),
        ("multiple_choice", _mc(candidates=["a", "b"]), r"2 candidates, expected 3 like the first valid item"),
        ("multiple_choice", _mc(candidates=["a", "b", "c", "d"]), r"4 candidates, expected 3 like the first valid"),
        ("multiple_choice", _mc(answer=3), r"answer 3 is out of range \(expected an index 0\.\.2 into the 3 cand"),
        ("multiple_choice", _mc(answer="first"), r"answer 'first' is not an integer \(expected an index into the c"),
        ("multiple_choice", _mc(question=""), r"empty question"),
        ("multiple_choice", _mc(rationales=["x", "y"], rationale=2), r"rationale 2 is out of range \(expected an in"),
        ("multiple_choice", _mc(rationale=0), r"rationale 0 given but no rationales"),
        ("multiple_choice", _mc(attributes=["red"]), r"attributes \['red'\] \(expected an object"),
        ("vqa", "{not json", r"invalid JSON"),
    ],
)
def test_bad_row_names_file_row_and_expectation(tmp_path: Path, images, kind: str, bad, message: str) -> None:
    good = {"vqa": _vqa(), "entailment": _ve(), "multiple_choice": _mc()}[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad, good])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 2: {message}"):
        load_task_manifest(path, kind)
    ds = load_task_manifest(path, kind, skip_bad=True)
    assert len(ds) == 2 and ds.skipped == 1 and ds.total == 3
    assert ds.skipped_reasons[0].startswith(f"{path} row 2: ")
    assert ds.summary().startswith(f"{path}: skipped 1 bad samples of 3 (first: {path} row 2: ")


def test_first_bad_row_in_file_order_is_reported(tmp_path: Path, images) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [_vqa(), _vqa(image="imgs/missing.png"), "{broken"])
    with pytest.raises(DataError, match=r"row 2: image"):
        load_task_manifest(path, "vqa")
    ds = load_task_manifest(path, "vqa", skip_bad=True)
    assert ds.skipped == 2 and [r.split(": ")[0][-5:] for r in ds.skipped_reasons] == ["row 2", "row 3"]


def test_choice_count_is_set_by_the_first_valid_item(tmp_path: Path, images) -> None:
    rows = [_mc(image="imgs/missing.png", candidates=["a", "b"]), _mc(), _mc(candidates=["a", "b"])]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    ds = load_task_manifest(path, "multiple_choice", skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 2 and "row 3: 2 candidates, expected 3" in ds.skipped_reasons[1]


@pytest.mark.parametrize(
    ("kind", "drop", "message"),
    [
        ("vqa", ("answers", "answer"), r"missing required column 'answers' or 'answer'"),
        ("vqa", ("question",), r"missing required column 'question'"),
        ("entailment", ("label",), r"missing required column 'label'"),
        ("multiple_choice", ("candidates",), r"missing required column 'candidates'"),
        ("multiple_choice", ("image",), r"missing required column 'image'"),
    ],
)
def test_missing_required_column_is_always_an_error(tmp_path: Path, images, kind, drop, message) -> None:
    rows = [{k: v for k, v in row.items() if k not in drop} for row in ROWS[kind]()]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: {message} for kind '{kind}'; columns found: "):
        load_task_manifest(path, kind, skip_bad=True)


def test_manifest_file_kind_and_vocabulary_errors(tmp_path: Path, images) -> None:
    with pytest.raises(DataError, match="not found"):
        load_task_manifest(tmp_path / "nope.jsonl", "vqa")
    with pytest.raises(DataError, match="task manifests are JSONL"):
        load_task_manifest(tmp_path / "m.csv", "vqa")
    path = write_jsonl(tmp_path / "m.jsonl", vqa_rows())
    with pytest.raises(DataError, match="kind 'qa' is not one of vqa, entailment, multiple_choice"):
        load_task_manifest(path, "qa")
    with pytest.raises(DataError, match="the answer vocabulary repeats"):
        load_task_manifest(path, "vqa", answers=["red", "red"])
    with pytest.raises(DataError, match="no valid samples out of 1"):
        load_task_manifest(write_jsonl(tmp_path / "bad.jsonl", [_vqa(question="")]), "vqa", skip_bad=True)


def test_dataset_subset_keeps_vocabulary_and_images(tmp_path: Path, images) -> None:
    ds = load_task_manifest(write_jsonl(tmp_path / "vqa.jsonl", vqa_rows()), "vqa", preload=True)
    assert ds[0]["image"] is ds[2]["image"]  # one decoded image per file
    sub = ds.subset([3, 0])
    assert len(sub) == 2 and sub.answers == ds.answers and sub.kind == "vqa"
    assert sub[0]["question"] == "What colour?" and sub[0]["answer"] == "blue" and sub[1]["answer_index"] == 1
    assert sub[1]["image"] is ds[0]["image"]
    with pytest.raises(IndexError):
        ds.subset([9])
    samples = [VQASample(image=str(images["red"]), question="q", answers=["a"])]
    with pytest.raises(DataError, match="got a VQASample, expected EntailmentSample for kind 'entailment'"):
        TaskDataset(samples, kind="entailment")
    assert TaskDataset(samples, answers=["b", "a"])[0]["answer_index"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def test_hf_saved_dataset_with_paths_and_column_mapping(tmp_path: Path, images) -> None:
    table = {
        "file": ["imgs/red.png", "imgs/blue.png"],
        "q": ["What colour?", "Which colour?"],
        "ans": [["red", "red", "pink"], ["blue"]],
        "attributes": [{"color": "red"}, {"color": "blue"}],
    }
    path = tmp_path / "saved"
    datasets.Dataset.from_dict(table).save_to_disk(str(path))
    write_png(path / "imgs" / "red.png", RED)
    write_png(path / "imgs" / "blue.png", BLUE)
    ds = load_task_hf(path, "vqa", columns={"image": "file", "question": "q", "answers": "ans"})
    assert [item["answer"] for item in ds] == ["red", "blue"] and ds.answers == ["red", "blue", "pink"]
    assert ds.samples[0].image == str(path / "imgs" / "red.png") and ds.samples[1].attributes == {"color": "blue"}
    assert ds[1]["image"].getpixel((0, 0)) == BLUE and ds.samples[1].id == "1"


def test_hf_in_memory_images_entailment_and_bad_rows(tmp_path: Path) -> None:
    features = datasets.Features(
        {"image": datasets.Image(), "hypothesis": datasets.Value("string"), "label": datasets.Value("string")}
    )
    table = {
        "image": [Image.new("RGB", (5, 5), RED), {"bytes": b"junk", "path": None}, Image.new("RGB", (5, 5), BLUE)],
        "hypothesis": ["It is red.", "Broken.", "It is wood."],
        "label": ["entailment", "neutral", "unknown"],
    }
    path = tmp_path / "ve"
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(path))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} row 1: image '.*\[1\]' cannot be decoded"):
        load_task_hf(path, "entailment")
    ds = load_task_hf(path, "entailment", skip_bad=True, preload=True)
    assert len(ds) == 1 and ds.skipped == 2
    assert "row 2: label 'unknown' is not an entailment label" in ds.skipped_reasons[1]
    assert ds[0]["label"] == 0 and ds[0]["image"].getpixel((4, 4)) == RED


def test_hf_choice_defaults_and_column_errors(tmp_path: Path, images) -> None:
    rows = [
        {"img": "imgs/red.png", "question": "Colour?", "choices": ["red", "blue"], "answer_index": 0},
        {"img": "imgs/blue.png", "question": "Colour?", "choices": ["red", "blue"], "answer_index": 1},
    ]
    data = write_jsonl(tmp_path / "hf.jsonl", rows)
    kwargs = {"data_files": str(data), "cache_dir": str(tmp_path / "hf_cache")}
    ds = load_task_hf("json", "multiple_choice", split="train", **kwargs)
    assert [item["candidates"][item["answer_index"]] for item in ds] == ["red", "blue"]
    assert ds.samples[0].image == str(images["red"])
    with pytest.raises(DataError, match=r"column 'options' \(mapped as 'candidates'\) not found; available columns: "):
        load_task_hf("json", "multiple_choice", split="train", columns={"candidates": "options"}, **kwargs)
    with pytest.raises(DataError, match=r"unknown column key 'hypothesis' for kind 'multiple_choice'; allowed keys"):
        load_task_hf("json", "multiple_choice", split="train", columns={"hypothesis": "question"}, **kwargs)
    with pytest.raises(DataError, match=r"missing required column 'hypothesis'.*dataset columns: \['img', 'quest"):
        load_task_hf("json", "entailment", split="train", **kwargs)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{**row, "img": str(images["red"])} for row in rows]).save_to_disk(str(saved))
    vqa = load_task_data(f"hf:{saved}", "vqa", split="train", columns={"answers": "choices"})
    assert vqa.kind == "vqa" and vqa[0]["answers"] == ["red", "blue"]


# ---------------------------------------------------------------------------------------------------------------
# Bundled easy-VQA


@pytest.fixture(scope="module")
def vqa_test() -> TaskDataset:
    return evt.easyvqa_vqa("test")


def test_bundled_vqa_uses_easyvqa_answers_questions_and_split(vqa_test) -> None:
    questions, answers, image_ids = easy_vqa.get_test_questions()
    assert len(vqa_test) == len(questions) == 9673
    assert sorted(vqa_test.answers) == sorted(easy_vqa.get_answers()) and len(vqa_test.answers) == 13
    assert vqa_test.answers == list(evt.train_answers())  # the training vocabulary, for train and test alike
    expected = Counter(zip(questions, answers, image_ids, strict=True))
    got = Counter((s.question, s.answers[0], int(s.id.split("-")[1])) for s in vqa_test.samples)
    assert got == expected
    types = {"yes": "yes_no", "no": "yes_no", **dict.fromkeys(COLORS, "colour"), **dict.fromkeys(SHAPES, "shape")}
    for i in range(0, len(vqa_test), 97):
        item = vqa_test[i]
        assert item["question_type"] == types[item["answer"]] and len(item["answers"]) == 1
        assert vqa_test.answers[item["answer_index"]] == item["answer"]
    labels = {img.image_id: img for img in image_labels("test").images}
    sample = vqa_test.samples[0]
    image_id = int(sample.id.split("-")[1])
    assert sample.attributes == {"color": labels[image_id].color, "shape": labels[image_id].shape}
    train = evt.easyvqa_vqa("train", limit=50)
    assert len(train) == 50 and train.answers == vqa_test.answers


def test_bundled_registry_and_load_data(vqa_test) -> None:
    data = load_data("bundled:easyvqa-vqa", split="test", limit=25)
    assert isinstance(data, TaskDataset) and data.kind == "vqa" and len(data) == 25
    mc = load_task_data("bundled:easyvqa-mc", "multiple_choice", split="train", limit=5, seed=1)
    assert len(mc) == 5 and mc.kind == "multiple_choice"
    with pytest.raises(DataError, match="holds entailment data, not 'vqa'"):
        load_task_data("bundled:easyvqa-entailment", "vqa", split="test", limit=3)
    with pytest.raises(DataError, match="holds image-caption pairs data"):
        load_task_data("bundled:easyvqa", "vqa", split="test", limit=3)
    assert isinstance(load_data("bundled:easyvqa", split="test", limit=4), LabelledData)  # pairs unchanged


def _mentions(text: str, words) -> list[str]:
    return [w for w in words if re.search(rf"\b{w}\b", text)]


def test_bundled_entailment_is_balanced_and_correct() -> None:
    ds = evt.easyvqa_entailment("test", limit=600)
    labels = {img.path: img for img in image_labels("test").images}
    assert len(ds) == 600 and Counter(item["label"] for item in ds) == {0: 200, 1: 200, 2: 200}
    for sample in ds.samples:
        img, text = labels[sample.image], sample.hypothesis
        assert sample.attributes == {"color": img.color, "shape": img.shape}
        colors, shapes = _mentions(text, COLORS), _mentions(text, SHAPES)
        undecidable = any(p in text for p in (*evt.UNDECIDABLE_PREDICATES, *evt._UNDECIDABLE_TAILS, "bigger than"))
        if sample.label == 0:  # every colour and shape it mentions is the image's, and nothing undecidable
            assert colors + shapes and set(colors) <= {img.color} and set(shapes) <= {img.shape}, text
            assert not undecidable, text
        elif sample.label == 2:  # it mentions a wrong colour or shape
            assert set(colors) - {img.color} or set(shapes) - {img.shape}, text
        else:  # undecidable, and refers to the image's true colour or shape
            assert undecidable and (img.color in colors or img.shape in shapes), text
    # Neutral hypotheses sometimes name a colour or shape the image does not have (in a comparison).
    neutral = [(s.hypothesis, labels[s.image]) for s in ds.samples if s.label == 1]
    assert any(set(_mentions(text, COLORS + SHAPES)) - {img.color, img.shape} for text, img in neutral)


def test_bundled_entailment_text_alone_does_not_decide_the_label() -> None:
    ds = evt.easyvqa_entailment("test")
    by_template: dict[str, Counter] = defaultdict(Counter)
    for sample in ds.samples:
        by_template[re.sub(rf"\b({'|'.join(COLORS + SHAPES)})\b", "X", sample.hypothesis)][sample.label] += 1
    best = sum(counts.most_common(1)[0][1] for counts in by_template.values()) / len(ds)
    assert best < 0.72  # a hypothesis-only model: about 2/3 at best, against 1/3 chance
    by_text: dict[str, set[int]] = defaultdict(set)
    for sample in ds.samples:
        by_text[sample.hypothesis].add(sample.label)
    assert by_text["There is a red circle."] == {0, 2}


def test_bundled_entailment_and_choice_are_deterministic() -> None:
    a, b = evt.easyvqa_entailment("train", limit=60, seed=3), evt.easyvqa_entailment("train", limit=60, seed=3)
    assert [(s.image, s.hypothesis, s.label) for s in a.samples] == [
        (s.image, s.hypothesis, s.label) for s in b.samples
    ]
    c = evt.easyvqa_entailment("train", limit=60, seed=4)
    assert [s.hypothesis for s in a.samples] != [s.hypothesis for s in c.samples]
    bigger = evt.easyvqa_entailment("train", limit=90, seed=3)
    assert [s.hypothesis for s in bigger.samples[:60]] == [s.hypothesis for s in a.samples]
    m1, m2 = evt.easyvqa_mc("test", limit=20, seed=5), evt.easyvqa_mc("test", limit=20, seed=5)
    assert [m1[i] | {"image": None} for i in range(20)] == [m2[i] | {"image": None} for i in range(20)]
    assert [s.candidates for s in evt.easyvqa_mc("test", limit=20, seed=6).samples] != [
        s.candidates for s in m1.samples
    ]


FACTS = {"no corners": "circle", "four corners": "rectangle", "three corners": "triangle"}


def _choice_true(kind: str, text: str, color: str, shape: str) -> bool:
    """Independent reading of a candidate answer or rationale: is it true of an image with this colour and shape?"""
    if kind == "rationale":
        filled = re.search(r"filled with (\w+)", text)
        fact = re.search(r"has (\w+ (?:corners|points))", text)
        ok_color = filled is None or filled.group(1) == color
        ok_shape = fact is None or FACTS.get(fact.group(1)) == shape
        return ok_color and ok_shape
    words = text.removeprefix("a ").split()
    return all(w in (color, shape) for w in words)


def test_bundled_choice_right_answers_and_rationales_are_true_distractors_false() -> None:
    ds = evt.easyvqa_mc("train", limit=150)
    labels = {img.path: img for img in image_labels("train").images}
    kinds = Counter()
    for sample in ds.samples:
        img = labels[sample.image]
        kinds[sample.question] += 1
        assert len(sample.candidates) == len(set(sample.candidates)) == 4
        assert len(sample.rationales) == len(set(sample.rationales)) == 4
        for i, candidate in enumerate(sample.candidates):
            assert _choice_true("answer", candidate, img.color, img.shape) == (i == sample.answer_index), sample
        for i, rationale in enumerate(sample.rationales):
            assert _choice_true("rationale", rationale, img.color, img.shape) == (i == sample.rationale_index), sample
    assert len(kinds) >= 5  # every question type in more than one phrasing
    assert len({s.answer_index for s in ds.samples}) == 4 and len({s.rationale_index for s in ds.samples}) == 4
