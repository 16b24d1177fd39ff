"""Tests for vldistill.data: manifests, Hugging Face datasets, bad-input handling, collation, bundled easy-VQA."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import easy_vqa
import pytest
import torch
from PIL import Image

from vldistill.data import (
    CLASSNAMES,
    COLORS_ZH,
    SHAPES_ZH,
    TEMPLATES,
    DataError,
    PairDataset,
    Sample,
    collate_raw,
    load_easyvqa,
    load_hf_dataset,
    load_manifest,
)
from vldistill.data import easyvqa as evqa

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def write_png(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Three tiny PNGs under tmp_path/imgs, plus a corrupt one."""
    paths = {
        "red": write_png(tmp_path / "imgs" / "red.png", RED),
        "green": write_png(tmp_path / "imgs" / "green.png", GREEN),
        "blue": write_png(tmp_path / "imgs" / "blue.png", BLUE),
    }
    paths["corrupt"] = tmp_path / "imgs" / "corrupt.png"
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Manifests


def test_jsonl_manifest_groups_parallel_captions_and_resolves_paths(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "imgs/red.png", "caption": "a red square", "id": "r", "label": 0},
            {"image": "imgs/green.png", "caption": "a green square", "lang": "en", "label": 1},
            {"image": "imgs/red.png", "caption": "一个红色的正方形", "lang": "zh", "id": "r", "label": 0},
            {"image": "imgs/green.png", "caption": "一个绿色的正方形", "lang": "zh", "label": 1},
        ],
    )
    ds = load_manifest(manifest)
    assert len(ds) == 2
    assert ds.languages == ["en", "zh"]
    assert ds.samples[0].image == str(images["red"].resolve())
    assert ds.samples[0].origin == f"{manifest} rows 1, 3"
    first, second = ds[0], ds[1]
    assert first["index"] == 0 and first["label"] == 0
    assert first["captions"] == {"en": "a red square", "zh": "一个红色的正方形"}
    assert second["captions"] == {"en": "a green square", "zh": "一个绿色的正方形"}
    assert isinstance(first["image"], Image.Image) and first["image"].mode == "RGB"
    assert first["image"].getpixel((0, 0)) == RED and second["image"].getpixel((1, 1)) == GREEN
    assert ds[-1]["index"] == 1
    with pytest.raises(IndexError):
        ds[2]


def test_manifest_repeated_id_and_language_gives_kth_caption_to_kth_sample(tmp_path: Path, images) -> None:
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "imgs/red.png", "caption": "en one"},
            {"image": "imgs/red.png", "caption": "en two"},
            {"image": "imgs/red.png", "caption": "zh one", "lang": "zh"},
            {"image": "imgs/red.png", "caption": "zh two", "lang": "zh"},
        ],
    )
    ds = load_manifest(manifest)
    assert [ds[i]["captions"] for i in range(len(ds))] == [
        {"en": "en one", "zh": "zh one"},
        {"en": "en two", "zh": "zh two"},
    ]
    assert ds.samples[0].image == ds.samples[1].image


def test_csv_manifest_with_image_root_default_lang_and_string_labels(tmp_path: Path, images) -> None:
    manifest_dir = tmp_path / "elsewhere"
    manifest_dir.mkdir()
    manifest = write_csv(
        manifest_dir / "pairs.csv",
        ["image", "caption", "label"],
        [["red.png", "  a red square ", "3"], ["blue.png", "a blue square", ""]],
    )
    ds = load_manifest(manifest, image_root=tmp_path / "imgs", preload=True)
    assert ds.languages == ["en"]
    assert [s.image for s in ds.samples] == [str(images["red"].resolve()), str(images["blue"].resolve())]
    assert ds[0]["captions"] == {"en": "a red square"}  # stripped
    assert [ds[0]["label"], ds[1]["label"]] == [3, -1]
    assert ds[1]["image"].getpixel((2, 2)) == BLUE
    assert ds.samples[1].origin == f"{manifest} row 3"  # the header is row 1


def test_tsv_and_unknown_suffix(tmp_path: Path, images) -> None:
    tsv = tmp_path / "m.tsv"
    tsv.write_text("image\tcaption\n\nimgs/red.png\ta, red, square\n", encoding="utf-8")
    ds = load_manifest(tsv)
    assert ds[0]["captions"] == {"en": "a, red, square"} and ds.samples[0].origin == f"{tsv} row 3"
    with pytest.raises(DataError, match=r"m\.txt: unknown manifest format '\.txt'"):
        load_manifest(tmp_path / "m.txt")


def test_missing_manifest_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl' not found"):
        load_manifest(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: errors name the file, the row and the problem; skip_bad drops and counts.


def bad_manifest(tmp_path: Path) -> Path:
    """Five samples: rows 2, 3 and 5 (1-based lines) are bad in three different ways."""
    return write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "imgs/red.png", "caption": "a red square"},
            {"image": "imgs/missing.png", "caption": "a missing square"},
            {"image": "imgs/corrupt.png", "caption": "a corrupt square"},
            {"image": "imgs/green.png", "caption": "a green square"},
            {"image": "imgs/blue.png", "caption": "   "},
        ],
    )


@pytest.mark.parametrize(
    ("keep_rows", "message"),
    [
        ([0, 1], r"train\.jsonl row 2: image '.*imgs/missing\.png' not found"),
        ([0, 2], r"train\.jsonl row 2: image '.*imgs/corrupt\.png' cannot be decoded \(UnidentifiedImageError"),
        ([0, 4], r"train\.jsonl row 2: empty caption for language 'en'"),
    ],
)
def test_bad_row_raises_naming_file_row_and_problem(tmp_path: Path, images, keep_rows, message) -> None:
    lines = bad_manifest(tmp_path).read_text(encoding="utf-8").splitlines()
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines[i] for i in keep_rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_manifest(manifest)


def test_truncated_png_cannot_be_decoded(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "cut.png", "caption": "noise"}])
    with pytest.raises(DataError, match=r"m\.jsonl row 1: image '.*cut\.png' cannot be decoded"):
        load_manifest(manifest)


def test_skip_bad_drops_and_counts_bad_rows(tmp_path: Path, images) -> None:
    ds = load_manifest(bad_manifest(tmp_path), skip_bad=True)
    assert len(ds) == 2
    assert [ds[i]["captions"]["en"] for i in range(2)] == ["a red square", "a green square"]
    assert ds.skipped == 3 and ds.total == 5
    reasons = ds.skipped_reasons
    assert len(reasons) == 3
    # in file order, however they were found (row 5 while reading rows, rows 2 and 3 when the images were opened)
    assert "row 2: image" in reasons[0] and "not found" in reasons[0]
    assert "row 3: image" in reasons[1] and "cannot be decoded" in reasons[1]
    assert "row 5: empty caption" in reasons[2]
    assert ds.summary().startswith(f"{tmp_path / 'train.jsonl'}: skipped 3 bad samples of 5 (first: ")


def test_skip_bad_drops_the_whole_parallel_sample(tmp_path: Path, images) -> None:
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "imgs/red.png", "caption": "red"},
            {"image": "imgs/red.png", "caption": "", "lang": "zh"},
            {"image": "imgs/blue.png", "caption": "blue"},
            {"image": "imgs/blue.png", "caption": "蓝色", "lang": "zh"},
        ],
    )
    with pytest.raises(DataError, match=r"m\.jsonl row 2: empty caption for language 'zh'"):
        load_manifest(manifest)
    ds = load_manifest(manifest, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 1
    assert ds.languages == ["en", "zh"]
    assert ds[0]["captions"] == {"en": "blue", "zh": "蓝色"}


def test_required_language_missing(tmp_path: Path, images) -> None:
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "imgs/red.png", "caption": "red"},
            {"image": "imgs/red.png", "caption": "红色", "lang": "zh"},
            {"image": "imgs/blue.png", "caption": "blue"},
        ],
    )
    with pytest.raises(DataError, match=r"m\.jsonl row 3: no caption for language 'zh' \(has: en\)"):
        load_manifest(manifest, languages=["en", "zh"])
    ds = load_manifest(manifest, languages=["en", "zh"], skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 1 and "skipped 1 bad samples of 2" in ds.summary()
    # Without `languages`, only the languages every sample has are used, with a warning about the others.
    with pytest.warns(UserWarning, match="ignoring languages only some"):
        assert load_manifest(manifest).languages == ["en"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_missing_column_names_column_file_and_columns_found(tmp_path: Path, images, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [{"image": "imgs/red.png", "text": "red"}])
    else:
        write_csv(path, ["image", "text"], [["imgs/red.png", "red"]])
    with pytest.raises(DataError) as info:
        load_manifest(path, skip_bad=True)  # a missing column is never skipped
    message = str(info.value)
    assert str(path) in message and "missing required column 'caption'" in message
    assert "columns found: 'image', 'text'" in message


def test_invalid_json_and_bad_label_rows(tmp_path: Path, images) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"image": "imgs/red.png", "caption": "red"}\n{not json\n\n'
        '{"image": "imgs/blue.png", "caption": "blue", "label": "cat"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"m\.jsonl row 2: invalid JSON"):
        load_manifest(manifest)
    ds = load_manifest(manifest, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 2
    assert "row 4: label 'cat' is not an integer" in ds.skipped_reasons[1]


def test_conflicting_labels_for_one_id(tmp_path: Path, images) -> None:
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "imgs/red.png", "caption": "red", "label": 1},
            {"image": "imgs/red.png", "caption": "红色", "lang": "zh", "label": 2},
        ],
    )
    with pytest.raises(DataError, match=r"row 2: label 2 differs from label 1 of .*row 1"):
        load_manifest(manifest)


def test_all_rows_bad_is_an_error_even_with_skip_bad(tmp_path: Path, images) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "imgs/missing.png", "caption": "x"}])
    with pytest.raises(DataError, match="no valid samples"):
        load_manifest(manifest, skip_bad=True)


# ---------------------------------------------------------------------------------------------------------------
# PairDataset and collate_raw


def test_pair_dataset_from_samples_preload_and_in_memory_images(images) -> None:
    samples = [
        Sample(str(images["red"]), {"en": "red"}, 0),
        Sample("mem[1]", {"en": "green"}, 1, data=png_bytes(GREEN)),
        Sample("mem[2]", {"en": "blue"}, 2, data=Image.new("L", (3, 3), 7)),
    ]
    lazy, eager = PairDataset(samples), PairDataset(samples, preload=True)
    for ds in (lazy, eager):
        assert [ds[i]["image"].getpixel((0, 0)) for i in range(3)] == [RED, GREEN, (7, 7, 7)]
        assert all(ds[i]["image"].mode == "RGB" for i in range(3))
    assert eager[0]["image"] is eager[0]["image"]  # kept, not decoded again
    with pytest.raises(DataError, match=r"sample 1: image 'mem\[1\]' cannot be decoded"):
        PairDataset([samples[0], Sample("mem[1]", {"en": "x"}, data=b"garbage")])
    with pytest.raises(DataError, match="label -2 is not a class index"):
        PairDataset([Sample(str(images["red"]), {"en": "x"}, -2)])


def test_collate_raw_groups_identical_captions() -> None:
    # Near-duplicates (case, punctuation, a prefix) are different captions; only identical strings share a group.
    captions_en = ["a red circle", "A red circle", "a red circle", "a red circle.", "A red circle"]
    captions_zh = ["红", "红", "红色", "红色", "红"]
    img = Image.new("RGB", (2, 2))
    batch = [
        {"index": 10 + i, "image": img, "captions": {"en": en, "zh": zh}, "label": i - 1}
        for i, (en, zh) in enumerate(zip(captions_en, captions_zh, strict=True))
    ]
    out = collate_raw(batch)
    assert out["index"].tolist() == [10, 11, 12, 13, 14] and out["index"].dtype == torch.long
    assert out["labels"].tolist() == [-1, 0, 1, 2, 3] and out["labels"].dtype == torch.long
    assert out["images"] == [img] * 5
    assert out["captions"] == {"en": captions_en, "zh": captions_zh}
    assert out["groups"]["en"].tolist() == [0, 1, 0, 2, 1]  # hand-checked
    assert out["groups"]["zh"].tolist() == [0, 0, 1, 1, 0]
    assert out["groups"]["en"].dtype == torch.long


def test_collate_raw_with_dataloader(tmp_path: Path, images) -> None:
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [{"image": f"imgs/{c}.png", "caption": "same" if c != "blue" else "other"} for c in ("red", "green", "blue")],
    )
    loader = torch.utils.data.DataLoader(load_manifest(manifest), batch_size=3, collate_fn=collate_raw)
    batch = next(iter(loader))
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["groups"]["en"].tolist() == [0, 0, 1]
    assert [im.getpixel((0, 0)) for im in batch["images"]] == [RED, GREEN, BLUE]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (local files only: no downloads)


def test_hf_json_with_column_mapping_resolves_paths_against_data_file(tmp_path: Path, images) -> None:
    data = write_jsonl(
        tmp_path / "hf.jsonl",
        [
            {"path": "imgs/red.png", "text": "red", "language": "en", "cls": 4},
            {"path": "imgs/red.png", "text": "红色", "language": "zh", "cls": 4},
            {"path": "imgs/blue.png", "text": "blue", "language": "en", "cls": 5},
            {"path": "imgs/blue.png", "text": "蓝色", "language": "zh", "cls": 5},
        ],
    )
    ds = load_hf_dataset(
        "json",
        data_files=str(data),
        columns={"image": "path", "caption": "text", "lang": "language", "label": "cls"},
        cache_dir=str(tmp_path / "hf_cache"),
    )
    assert len(ds) == 2 and ds.languages == ["en", "zh"]
    assert ds.samples[1].image == str(images["blue"].resolve())
    assert ds[1]["captions"] == {"en": "blue", "zh": "蓝色"} and ds[1]["label"] == 5
    assert ds[0]["image"].getpixel((0, 0)) == RED


def test_hf_csv_with_per_language_caption_columns(tmp_path: Path, images) -> None:
    data = write_csv(tmp_path / "hf.csv", ["file", "en", "zh"], [["imgs/red.png", "red", "红色"]])
    ds = load_hf_dataset(
        "csv",
        data_files=str(data),
        columns={"image": "file", "caption_en": "en", "caption_zh": "zh"},
        cache_dir=str(tmp_path / "hf_cache"),
    )
    assert len(ds) == 1 and ds[0]["captions"] == {"en": "red", "zh": "红色"} and ds[0]["label"] == -1


def saved_image_dataset(tmp_path: Path) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    table = {
        "image": [Image.new("RGB", (5, 5), RED), Image.new("RGB", (5, 5), BLUE), {"bytes": b"junk", "path": None}],
        "caption": ["red", "blue", "broken"],
    }
    path = tmp_path / "saved"
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(path))
    return path


def test_hf_in_memory_image_column_from_saved_dataset(tmp_path: Path) -> None:
    path = saved_image_dataset(tmp_path)
    with pytest.raises(DataError, match=rf"{path} row 2: image '{path}\[2\]' cannot be decoded"):
        load_hf_dataset(path, split=None)
    ds = load_hf_dataset(path, split=None, skip_bad=True, preload=True)
    assert len(ds) == 2 and ds.skipped == 1
    assert [s.image for s in ds.samples] == [f"{path}[0]", f"{path}[1]"]
    assert ds[0]["image"].getpixel((4, 4)) == RED and ds[1]["image"].getpixel((0, 0)) == BLUE
    assert ds[1]["captions"] == {"en": "blue"}


def test_hf_missing_columns_list_available_columns(tmp_path: Path, images) -> None:
    data = write_jsonl(tmp_path / "hf.jsonl", [{"path": "imgs/red.png", "text": "red"}])
    kwargs = {"data_files": str(data), "cache_dir": str(tmp_path / "hf_cache")}
    with pytest.raises(DataError, match=r"column 'caption_text' \(mapped as 'caption'\) not found.*'path', 'text'"):
        load_hf_dataset("json", columns={"image": "path", "caption": "caption_text"}, **kwargs)
    with pytest.raises(
        DataError, match=r"no image column \(looked for image, img.*available columns: \['path', 'text'\]"
    ):
        load_hf_dataset("json", **kwargs)
    with pytest.raises(DataError, match="unknown column key 'picture'"):
        load_hf_dataset("json", columns={"picture": "path"}, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Bundled easy-VQA


@pytest.fixture(scope="module")
def bundled() -> evqa.BundledData:
    return load_easyvqa()


def test_bundled_sizes_languages_and_classes(bundled) -> None:
    assert len(bundled.train) == 4000 and len(bundled.test) == 1000
    assert bundled.train.languages == ["en", "zh"] and bundled.test.languages == ["en", "zh"]
    assert len(CLASSNAMES["en"]) == len(CLASSNAMES["zh"]) == 24
    assert bundled.classnames == CLASSNAMES
    for en, zh in zip(bundled.classnames["en"], bundled.classnames["zh"], strict=True):
        color, shape = en.split()
        assert zh == COLORS_ZH[color] + SHAPES_ZH[shape]
    assert len(set(bundled.classnames["en"])) == 24 and len(set(bundled.classnames["zh"])) == 24
    for split in (bundled.train, bundled.test):
        labels = {s.label for s in split.samples}
        assert labels == set(range(24))  # every label in range, every class present


def test_bundled_captions_are_parallel_and_match_labels(bundled) -> None:
    for split in (bundled.train, bundled.test):
        for sample in split.samples:
            color, shape = bundled.classnames["en"][sample.label].split()
            en, zh = sample.captions["en"], sample.captions["zh"]
            assert color in en.split() and shape in en.split()
            assert COLORS_ZH[color] in zh and SHAPES_ZH[shape] in zh
    # A known image: easy-vqa's own answers say train image 2 holds a red triangle.
    sample = bundled.train.samples[2]
    assert sample.image.endswith("/train/images/2.png")
    assert "红色" in sample.captions["zh"] and "三角形" in sample.captions["zh"]
    phrasings = {s.captions["en"].replace("red", "C").replace("circle", "S") for s in bundled.train.samples}
    assert len([p for p in phrasings if "C" in p and "S" in p]) >= 4  # several phrasings, not one format


def test_caption_phrasings_are_translations() -> None:
    en = [evqa.caption("red", "circle", k, "en") for k in range(len(evqa.CAPTION_PHRASINGS["en"]))]
    zh = [evqa.caption("red", "circle", k, "zh") for k in range(len(evqa.CAPTION_PHRASINGS["zh"]))]
    assert en == [
        "a red circle",
        "a red circle on a light background",
        "a circle that is red",
        "red circle",
        "there is a red circle",
        "a red circle shape",
    ]
    assert zh == [
        "一个红色的圆形",
        "浅色背景上的一个红色圆形",
        "一个圆形，颜色是红色",
        "红色圆形",
        "有一个红色的圆形",
        "一个红色圆形图形",
    ]


def test_bundled_en_and_zh_captions_use_the_same_phrasing(bundled) -> None:
    n_phrasings = len(evqa.CAPTION_PHRASINGS["en"])
    used = set()
    for split in (bundled.train, bundled.test):
        for sample in split.samples:
            color, shape = bundled.classnames["en"][sample.label].split()
            k = [evqa.caption(color, shape, j, "en") for j in range(n_phrasings)].index(sample.captions["en"])
            assert sample.captions["zh"] == evqa.caption(color, shape, k, "zh")
            used.add(k)
    assert used == set(range(n_phrasings))


def test_bundled_captions_differ_from_zero_shot_prompts(bundled) -> None:
    for lang in ("en", "zh"):
        assert all("{}" in t for t in TEMPLATES[lang]) and len(TEMPLATES[lang]) >= 5
        prompts = {t.format(name) for t in TEMPLATES[lang] for name in CLASSNAMES[lang]}
        assert not prompts & {s.captions[lang] for s in bundled.train.samples}


def test_bundled_train_and_test_images_are_disjoint(bundled) -> None:
    train = {s.image for s in bundled.train.samples}
    test = {s.image for s in bundled.test.samples}
    assert len(train) == 4000 and len(test) == 1000 and not train & test
    item = bundled.test[0]
    assert item["image"].size == (64, 64) and item["image"].mode == "RGB"


def test_derived_labels_agree_with_every_easyvqa_answer(bundled) -> None:
    """An independent reading of each question, checked against the labels of the image it is about."""
    colors, shapes = set(COLORS_ZH), set(SHAPES_ZH)
    for split, questions, ds in (
        ("train", easy_vqa.get_train_questions(), bundled.train),
        ("test", easy_vqa.get_test_questions(), bundled.test),
    ):
        by_id = {int(Path(s.image).stem): bundled.classnames["en"][s.label].split() for s in ds.samples}
        checked = 0
        for question, answer, image_id in zip(*questions, strict=True):
            color, shape = by_id[image_id]
            words = set(question.rstrip("?").split())
            if answer in colors:
                assert answer == color, (split, image_id, question)
            elif answer in shapes:
                assert answer == shape and not (words & colors - {color}), (split, image_id, question)
            else:
                (named,) = words & (colors | shapes)
                negated = "not" in words or question.startswith("is no ")
                assert (answer == "yes") == ((named in (color, shape)) != negated), (split, image_id, question)
            checked += 1
        assert checked > 9000


def test_pixel_reading_agrees_with_question_labels(bundled) -> None:
    """The pixel fallback is trusted only because it agrees with the questions wherever they decide."""
    for split, ds in (("train", bundled.train), ("test", bundled.test)):
        labels = evqa.image_labels(split)
        assert sum(bool(img.from_pixels) for img in labels.images) < 0.15 * len(labels.images)
        for i, img in enumerate(labels.images):
            assert evqa.read_pixels(ds[i]["image"]) == (img.color, img.shape), (split, img.image_id)


def test_labels_are_cached(bundled) -> None:
    assert evqa.image_labels("train") is evqa.image_labels("train")
    coverage = evqa.image_labels("test").coverage
    assert coverage["shape"]["what shape"] > 0 and coverage["color"]["yes/no color"] > 0


def test_limit_is_deterministic_nested_and_keeps_captions(bundled) -> None:
    small, larger, again = load_easyvqa(limit=5), load_easyvqa(limit=12), load_easyvqa(limit=5)
    other_seed = load_easyvqa(split="train", limit=5, seed=1)
    assert len(small.train) == 5 and len(small.test) == 5 and len(larger.train) == 12
    assert small.train.samples == again.train.samples
    assert larger.train.samples[:5] == small.train.samples and larger.test.samples[:5] == small.test.samples
    assert other_seed.test is None and other_seed.train.samples != small.train.samples
    full = {s.image: s for s in bundled.train.samples}
    assert all(full[s.image] == s for s in larger.train.samples)  # same captions and labels as the full set


def test_languages_and_eval_set() -> None:
    data = load_easyvqa(split="test", languages=["zh"], limit=3)
    assert data.train is None and list(data.classnames) == ["zh"] and data.test.languages == ["zh"]
    assert set(data.test[0]["captions"]) == {"zh"}
    zs = data.eval_set("zh")
    assert zs.dataset is data.test and zs.classnames == CLASSNAMES["zh"] and zs.templates == TEMPLATES["zh"]
    with pytest.raises(DataError, match="language 'en' was not loaded"):
        data.eval_set("en")
    with pytest.raises(DataError, match="languages must be distinct tags"):
        load_easyvqa(languages=["fr"])


@pytest.fixture
def fake_easyvqa(monkeypatch, tmp_path: Path):
    """Replaces easy-vqa's test split with one image and the questions a test sets; clears the label cache."""
    image = tmp_path / "0.png"
    Image.new("RGB", (64, 64), WHITE).save(image)
    questions: list[tuple[str, str]] = []
    monkeypatch.setattr(evqa.easy_vqa, "get_test_image_paths", lambda: {0: str(image)})
    monkeypatch.setattr(
        evqa.easy_vqa,
        "get_test_questions",
        lambda: ([q for q, _ in questions], [a for _, a in questions], [0] * len(questions)),
    )
    evqa._parse_split.cache_clear()
    yield questions
    evqa._parse_split.cache_clear()


def test_contradicting_answers_are_an_error(fake_easyvqa) -> None:
    fake_easyvqa += [("what shape is in the image?", "circle"), ("is there a triangle?", "yes")]
    with pytest.raises(DataError, match="easy-vqa test image 0: inconsistent shape labels"):
        evqa.image_labels("test")


def test_answer_ruled_out_elsewhere_is_an_error(fake_easyvqa) -> None:
    fake_easyvqa += [("what color is the shape?", "red"), ("is no red shape present?", "yes")]
    with pytest.raises(DataError, match=r"color 'red' is stated by .* but ruled out"):
        evqa.image_labels("test")


def test_unknown_question_form_is_an_error(fake_easyvqa) -> None:
    fake_easyvqa += [("how many shapes are there?", "1")]
    with pytest.raises(DataError, match="unknown question form 'how many shapes are there\\?'"):
        evqa.image_labels("test")
