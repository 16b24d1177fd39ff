"""Free texts (``data.texts``): texts without images that a stage adds to its micro-batches, embedded by the teacher
once before training. Reading them, drawing them in a seeded order, training the text tower on them (and only in the
stages that say so), reading the teacher's table from a cache, and the errors a user meets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import COLOURS, SHAPES, pair_items, tiny_train
from vldistill.batching import Collator, LiveTeachers
from vldistill.cache import build_recipe_cache, open_recipe_cache
from vldistill.cache.texts import free_text_file, load_free_text_tables
from vldistill.config import ConfigError, load_recipe, to_dict
from vldistill.data.pairs import DataError
from vldistill.data.texts import free_field, load_free_texts
from vldistill.models import as_teacher
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.loop import Trainer
from vldistill.train.sampling import StageSampler

# words that only the free texts hold: their token embeddings train only through the free-text term
FREE = ["where is the bicycle?", "a bicycle near the river", "the river is wide", "wide bicycle lanes"]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"a {c} {s}" for c in COLOURS for s in SHAPES] + FREE
    return train_wordpiece(corpus * 4, vocab_size=150)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    torch.manual_seed(1)
    return as_teacher(build_student("test-clip", tokenizer), languages=["en"])


@pytest.fixture()
def free_file(tmp_path) -> Path:
    path = tmp_path / "free.txt"
    path.write_text("\n".join(FREE) + "\n")
    return path


def recipe(tmp_path: Path, free_file: Path | None, texts: int = 4, extra_loss: dict | None = None, **teacher):
    losses = [
        {"name": "fd", "tower": "image"},
        {"name": "fd", "tower": "text", "lang": "en"},
        extra_loss or {"name": "fd", "tower": "text", "lang": "texts.en"},
    ]
    raw = {
        "name": "free",
        "student": {"preset": "test-clip"},
        "teacher": {"name_or_path": None, **teacher},
        "data": {"train": "bundled:easyvqa", "eval": None, "languages": ["en"], "paired": 4},
        "stages": [
            {"name": "unimodal", "steps": 3, "samples": "all", "texts": texts, "losses": losses},
            {"name": "align", "steps": 1, "losses": [{"name": "clip", "langs": ["en"]}]},
        ],
        "train": tiny_train(tmp_path / "run"),
    }
    if free_file is not None:
        raw["data"]["texts"] = {"en": [str(free_file)]}
    return load_recipe(raw=raw)


def _row(student, tokenizer, word: str) -> torch.Tensor:
    (token,) = tokenizer.convert_tokens_to_ids([word])
    emb = student.model.text_model.embeddings.token_embedding.weight
    return emb[token].detach().clone()


# ------------------------------------------------------------------------------------------ reading
def test_sources_are_read_stripped_and_deduplicated_per_language(tmp_path):
    (tmp_path / "a.txt").write_text("  one text \nsecond\none text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "second"}\n')
    free = load_free_texts(
        {"en": [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], "zh": [str(tmp_path / "a.txt")]}
    )
    assert free.texts == ["one text", "second", "third", "one text", "second"]
    assert free.fields == ["texts.en"] * 3 + ["texts.zh"] * 2
    assert free.counts() == {"texts.en": 3, "texts.zh": 2}
    assert free.item(3) == {"free_index": 3, "free_field": "texts.zh", "free_text": "one text"}
    same = load_free_texts(
        {"en": [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], "zh": [str(tmp_path / "a.txt")]}
    )
    assert same.fingerprint() == free.fingerprint()
    assert load_free_texts({"en": [str(tmp_path / "a.txt")]}).fingerprint() != free.fingerprint()


def test_the_bundled_questions_are_english_text_without_images():
    free = load_free_texts({"en": ["bundled:easyvqa-questions"]})
    assert len(free) == len(set(free.texts)) > 100
    assert "what shape is in the image?" in free.texts
    with pytest.raises(DataError, match=re.escape("data.texts.zh: bundled:easyvqa-questions holds 'en' texts")):
        load_free_texts({"zh": ["bundled:easyvqa-questions"]})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("gap.txt", "one\n\nthree\n", "gap.txt line 2: an empty text"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "bad.jsonl line 2: not JSON"),
        ("key.jsonl", '{"caption": "ok"}\n', "key.jsonl line 1: expected an object with a 'text' string"),
        ("empty.jsonl", '{"text": "  "}\n', "empty.jsonl line 1: an empty text"),
        ("nothing.txt", "", "nothing.txt holds no texts"),
        ("texts.csv", "a,b\n", "texts.csv: expected a .txt file (one text per line), a .jsonl file"),
    ],
)
def test_bad_sources_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_free_texts({"en": [str(tmp_path / name)]})


def test_a_byte_order_mark_is_not_part_of_the_first_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufefffirst\nsecond\n".encode())
    assert load_free_texts({"en": [str(tmp_path / "bom.txt")]}).texts == ["first", "second"]


def test_a_missing_source_or_unknown_bundled_name_is_named(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"data.texts.en: {tmp_path / 'no.txt'} does not exist")):
        load_free_texts({"en": [str(tmp_path / "no.txt")]})
    with pytest.raises(DataError, match="unknown bundled texts 'bundled:wiki'"):
        load_free_texts({"en": ["bundled:wiki"]})


def test_config_checks_where_free_texts_may_go():
    with pytest.raises(ConfigError, match="free texts are unpaired data, for stages with samples: all"):
        load_recipe("dcclip", {"stages.1.texts": 8})
    with pytest.raises(ConfigError, match=re.escape("texts = -1: give 0 (none) or a number of free texts")):
        load_recipe("dcclip", {"stages.0.texts": -1})
    with pytest.raises(ConfigError, match=re.escape("texts.en = []: give at least one source")):
        load_recipe("dcclip", {"data.texts": {"en": []}})


# ------------------------------------------------------------------------------------------ drawing
def test_every_micro_batch_holds_its_texts_after_its_samples_in_a_resumable_order():
    sampler = StageSampler(16, 4, seed=3, stage=0, total=12, texts=(3, [7]))
    batches = list(sampler)
    assert sampler.batch_size == 7  # what Accelerate splits each micro-batch by
    assert all(len(b) == 7 and all(k < 16 for k in b[:4]) and all(k >= 16 for k in b[4:]) for b in batches)
    stream = [k - 16 for b in batches for k in b[4:]]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))  # each text once per pass
    assert stream[:7] != stream[7:14]  # a new order each pass
    resumed = list(StageSampler(16, 4, seed=3, stage=0, total=12, start=5, texts=(3, [7])))
    assert resumed == batches[5:]
    other = [k for b in StageSampler(16, 4, seed=4, stage=0, total=12, texts=(3, [7])) for k in b[4:]]
    assert [k - 16 for k in other] != stream


def test_each_language_gets_its_own_share_and_order():
    # rows 0-4 are texts.en, rows 5-7 texts.zh: every micro-batch holds 2 of each, each language in its own order
    batches = list(StageSampler(16, 4, seed=1, stage=0, total=6, texts=(2, [5, 3])))
    assert StageSampler(16, 4, seed=1, stage=0, total=1, texts=(2, [5, 3])).batch_size == 8
    en = [k - 16 for b in batches for k in b[4:6]]
    zh = [k - 16 for b in batches for k in b[6:8]]
    assert all(0 <= r < 5 for r in en) and all(5 <= r < 8 for r in zh)
    assert sorted(en[:5]) == list(range(5)) and sorted(zh[:3]) == [5, 6, 7]
    alone = [k - 16 for b in StageSampler(16, 4, seed=1, stage=0, total=6, texts=(2, [5])) for k in b[4:]]
    assert en == alone  # the first language's order does not depend on the others
    (split,) = list(StageSampler(16, 4, seed=1, stage=0, total=1, texts=(2, [5, 3]), pieces=2))
    first = batches[0]
    assert split == [*first[:2], first[4], first[6], *first[2:4], first[5], first[7]]


def test_processes_get_equal_shares_of_samples_and_texts():
    (batch,) = list(StageSampler(16, 4, seed=0, stage=0, total=1, texts=(2, [5]), pieces=2))
    (plain,) = list(StageSampler(16, 4, seed=0, stage=0, total=1, texts=(2, [5])))
    samples, texts = plain[:4], plain[4:]
    assert batch == samples[:2] + texts[:1] + samples[2:] + texts[1:]
    with pytest.raises(ValueError, match="3 free texts per micro-batch do not split evenly over 2 processes"):
        StageSampler(16, 4, seed=0, stage=0, total=1, texts=(3, [5]), pieces=2)


def test_the_collator_routes_free_texts_to_their_own_field(tokenizer, teacher):
    student = build_student("test-clip", tokenizer)
    free = [
        {"free_index": 5, "free_field": "texts.en", "free_text": FREE[0]},
        {"free_index": 2, "free_field": "texts.en", "free_text": FREE[1]},
        {"free_index": 9, "free_field": "texts.zh", "free_text": FREE[2]},
    ]
    items = [*pair_items(2), *free]
    batch = Collator(student, [], ["en"], [])(items)
    assert batch["index"].tolist() == [0, 1]
    assert batch["texts"]["texts.en"].tolist() == [5, 2] and batch["texts"]["texts.zh"].tolist() == [9]
    assert batch["student"]["pixel_values"].shape[0] == 2
    assert batch["student"]["text"]["en"]["input_ids"].shape[0] == 2
    assert batch["student"]["text"][free_field("en")]["input_ids"].shape[0] == 2
    assert batch["student"]["text"][free_field("zh")]["input_ids"].shape[0] == 1


def test_the_step_gives_each_free_text_its_own_teacher_row(tokenizer, teacher):
    from vldistill.cache.texts import FreeTextTable
    from vldistill.losses import WeightedLoss
    from vldistill.losses.features import FeatureDistillation
    from vldistill.outputs import Dims
    from vldistill.train.step import DistillModule

    student = build_student("test-clip", tokenizer)
    table = FreeTextTable(torch.randn(6, teacher.dims.embed), frozenset({"texts.en"}))
    seen = {}

    class Spy(FeatureDistillation):
        def forward(self, out):
            seen["student"], seen["teacher"] = out.student.text["texts.en"], out.teachers[0].text["texts.en"]
            return super().forward(out)

    dims = Dims(student.dims, (teacher.dims,))
    loss = WeightedLoss([("fd_free", 1.0, Spy(dims, tower="text", lang="texts.en"))])
    items = [*pair_items(2), *({"free_index": r, "free_field": "texts.en", "free_text": FREE[r % 4]} for r in (4, 1))]
    batch = Collator(student, [teacher], ["en"], [["en"]])(items)
    DistillModule(student, loss, LiveTeachers([teacher]), free_tables=[table])(batch)
    assert torch.equal(seen["teacher"], table.embeddings[[4, 1]])  # row for row, in the batch's order
    with torch.no_grad():
        enc = student.tokenizer([FREE[0], FREE[1]], padding=True, return_tensors="pt")
        expected = student.encode_text(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(seen["student"], expected)


# ------------------------------------------------------------------------------------------ training
def test_the_free_text_term_trains_the_text_tower_on_words_only_free_texts_hold(
    tmp_path, tokenizer, teacher, free_file
):
    torch.manual_seed(0)
    student = build_student("test-clip", tokenizer)
    before = _row(student, tokenizer, "bicycle")
    caption_word = _row(student, tokenizer, "circle")
    trainer = Trainer(recipe(tmp_path, free_file), student, pair_items(16), [teacher])
    assert trainer.free.counts() == {"texts.en": 4}
    result = trainer.fit()
    first = result.history[0]
    assert first["fd_text_texts_en"] > 0  # the free-text term is logged beside the caption term
    cos = torch.nn.functional.cosine_similarity
    assert cos(_row(student, tokenizer, "bicycle"), before, dim=0) < 0.99  # learnt from the free texts only
    assert cos(_row(student, tokenizer, "circle"), caption_word, dim=0) < 0.99

    torch.manual_seed(0)
    alone = build_student("test-clip", tokenizer)
    Trainer(recipe(tmp_path / "none", None), alone, pair_items(16), [teacher]).fit()
    # without free texts that row gets no gradient: weight decay only shrinks it
    assert cos(_row(alone, tokenizer, "bicycle"), before, dim=0) > 0.99999


def test_without_data_texts_the_term_is_left_out_with_a_notice(tmp_path, tokenizer, teacher, capsys):
    trainer = Trainer(recipe(tmp_path, None), build_student("test-clip", tokenizer), pair_items(16), [teacher])
    out = capsys.readouterr().out
    assert "no data.texts: left out stages.0.losses.2 (fd on ['texts.en'])" in out
    assert [t.options.get("lang") for t in trainer.cfg.stages[0].losses] == [None, "en"]
    assert trainer.cfg.stages[0].texts == 0
    rows = trainer.fit().history
    assert all("fd_text_texts_en" not in row for row in rows)


def test_free_text_mistakes_fail_before_training_naming_the_key(tmp_path, tokenizer, teacher, free_file):
    student = build_student("test-clip", tokenizer)
    cfg = recipe(tmp_path, free_file, extra_loss={"name": "fd", "tower": "text", "lang": "texts.zh"})
    with pytest.raises(ConfigError, match=re.escape("stages.0.losses.2 (fd) reads ['texts.zh'], but data.texts has")):
        Trainer(cfg, student, pair_items(16), [teacher])
    cfg = recipe(tmp_path, free_file, texts=0)
    with pytest.raises(ConfigError, match=re.escape("reads ['texts.en'], but stages.0.texts is 0")):
        Trainer(cfg, student, pair_items(16), [teacher])
    cfg = recipe(tmp_path, free_file, extra_loss={"name": "fd", "tower": "text", "lang": "texts.en", "level": "token"})
    with pytest.raises(ConfigError, match="free texts give pooled embeddings only"):
        Trainer(cfg, student, pair_items(16), [teacher])
    only_fd = "only fd on the text tower reads them, with teacher_lang left out"
    for term in (
        {"name": "xling", "langs": ["texts.en"], "target_lang": "en"},
        {"name": "fd", "tower": "text", "lang": "texts.en", "teacher_lang": "en"},
    ):
        with pytest.raises(ConfigError, match=re.escape(only_fd)):
            Trainer(recipe(tmp_path, free_file, extra_loss=term), student, pair_items(16), [teacher])
    raw = to_dict(recipe(tmp_path, free_file))
    raw["data"]["texts"]["zh"] = raw["data"]["texts"]["en"]
    raw["stages"][0]["losses"][2]["options"]["lang"] = "texts.zh"  # an English-only teacher
    with pytest.raises(ConfigError, match=re.escape("reads ['texts.zh'], but teachers.0 embeds ['en']")):
        Trainer(load_recipe(raw=raw), student, pair_items(16), [teacher])


def test_a_table_file_belongs_to_its_teachers_languages_and_texts(tmp_path):
    a = load_free_texts({"en": ["bundled:easyvqa-questions"]})
    (tmp_path / "b.txt").write_text("another text\n")
    b = load_free_texts({"en": [str(tmp_path / "b.txt")]})
    one, two = [{"id": "t", "weights": "1"}], [{"id": "t", "weights": "2"}]
    base = free_text_file(tmp_path, one, [["en"]], a)
    assert base == free_text_file(tmp_path, one, [["en"]], a)
    assert (
        len({base, free_text_file(tmp_path, two, [["en"]], a), free_text_file(tmp_path, one, [["en", "zh"]], a)}) == 3
    )
    assert free_text_file(tmp_path, one, [["en"]], b) != base


def test_resuming_with_other_free_texts_is_refused_naming_them():
    from vldistill.train.rundir import config_differences

    old = {"data": {"texts": {"en": ["a.txt"]}}}
    assert config_differences(old, {"data": {"texts": {"en": ["a.txt"], "zh": ["b.txt"]}}}) == [
        'data.texts ({"en": ["a.txt"]} there, {"en": ["a.txt"], "zh": ["b.txt"]} now)'
    ]
    assert config_differences({"data": {"texts": {}}}, old) != []
    assert config_differences(old, old) == []


def test_a_cached_teacher_keeps_its_free_text_table_beside_the_shards(tmp_path, tokenizer, teacher, free_file):
    teacher.save_pretrained(tmp_path / "teacher")
    cache = tmp_path / "cache"
    cfg = recipe(tmp_path, free_file, name_or_path=str(tmp_path / "teacher"), source="cache", cache=str(cache))
    items = pair_items(16)
    build_recipe_cache(cfg, [teacher], items)
    source = open_recipe_cache(cfg, items)
    free = load_free_texts(cfg.data.texts)
    path = free_text_file(cache, source.teacher_entries(), [["en"]], free)
    assert not path.exists()
    trainer = Trainer(cfg, build_student("test-clip", tokenizer), items, [teacher], source)  # computes and stores it
    assert path.is_file()
    (table,) = load_free_text_tables(path, 1, len(free))
    assert torch.allclose(table.embeddings, trainer.free_tables[0].embeddings)
    assert table.fields == {"texts.en"}

    # a later run from the cache needs no teacher: the table is read
    again = Trainer(cfg, build_student("test-clip", tokenizer), items, [], open_recipe_cache(cfg, items))
    assert torch.equal(again.free_tables[0].embeddings, table.embeddings)
    again.fit()

    path.write_bytes(b"damaged")
    with pytest.raises(Exception, match=re.escape(f"{path} is damaged")):
        Trainer(cfg, build_student("test-clip", tokenizer), items, [], open_recipe_cache(cfg, items))


def test_vldistill_cache_embeds_the_free_texts_beside_the_shards(tmp_path, teacher, free_file):
    from vldistill.train.fit import cache_recipe

    teacher.save_pretrained(tmp_path / "teacher")
    cache = tmp_path / "cache"
    cfg = recipe(tmp_path, free_file, name_or_path=str(tmp_path / "teacher"), source="cache", cache=str(cache))
    cfg.data.limit_train = 12
    result = cache_recipe(cfg, teachers=[teacher])
    assert result["free_texts"] == len(FREE)
    (path,) = cache.glob("texts-*.safetensors")
    (table,) = load_free_text_tables(path, 1, len(FREE))
    assert table.embeddings.shape == (len(FREE), teacher.dims.embed) and bool(table.embeddings.abs().sum() > 0)
