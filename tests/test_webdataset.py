"""Webdataset tar shards as a data source, and the cheap shard fingerprint a cache stores for them."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import vldistill.data.webdataset as wds_mod
from vldistill.cache import CachedTeachers, CacheError, build_cache, teacher_identity
from vldistill.config import CacheConfig
from vldistill.data.pairs import DataError
from vldistill.data.sources import load_data
from vldistill.data.webdataset import TarPairs, iter_shard
from vldistill.models import load_teacher
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece

pytestmark = pytest.mark.usefixtures("one_thread")
COLORS = ["red", "green", "blue", "yellow"]


def caption(shard: int, i: int) -> str:
    return f"a {COLORS[(shard + i) % 4]} square number {shard * 8 + i}"


def write_shards(directory: Path, shards: int = 3, per_shard: int = 8, change: dict | None = None) -> str:
    """``{000..NNN}.tar`` of tiny PNGs with ``.txt`` captions and ``.json`` metadata, as img2dataset lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(directory / f"{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), COLORS[(s + i) % 4]).save(buf, "PNG")
                text = (change or {}).get((s, i), caption(s, i))
                members = {"png": buf.getvalue(), "txt": text.encode(), "json": json.dumps({"label": i % 4}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"wds:{directory}/{{000..{shards - 1:03d}}}.tar"


def test_tar_shards_load_by_brace_pattern_with_captions_and_labels(tmp_path):
    spec = write_shards(tmp_path / "wds")
    data = load_data(spec, languages=["en"]).dataset
    assert isinstance(data, TarPairs) and len(data) == 24 and len(data.shards) == 3
    item = data[13]
    assert item["captions"] == {"en": caption(1, 5)} and item["label"] == 5 % 4
    assert item["image"].size == (8, 8) and item["image"].getpixel((0, 0)) == (0, 0, 255)  # COLORS[(1 + 5) % 4]
    assert len(load_data(spec, languages=["en"], limit=10).dataset) == 10
    keys = [s["__key__"] for s in iter_shard(tmp_path / "wds" / "001.tar")]  # the webdataset package streams it
    assert keys == [f"001{i:04d}" for i in range(8)]


def test_missing_shards_and_samples_without_captions_are_named(tmp_path):
    write_shards(tmp_path, shards=2)
    with pytest.raises(DataError, match=r"1 of 3 tar shards not found \(first: .*002\.tar\)"):
        TarPairs(f"{tmp_path}/{{000..002}}.tar")
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        info = tarfile.TarInfo("k1.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match=r"bad\.tar: sample 'k1' has no a caption \(\.txt\)"):
        TarPairs(str(tmp_path / "bad.tar"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(5)
    tok = train_wordpiece([caption(s, i) for s in range(3) for i in range(8)], vocab_size=120)
    path = tmp_path_factory.mktemp("teacher") / "model"
    build_student("test-clip", tok, projection_dim=24, **{"vision.hidden_size": 48}).save_pretrained(path)
    return load_teacher(path, languages=["en"])


def test_opening_a_cache_of_tar_shards_reads_no_row_and_refuses_a_changed_caption(tmp_path, teacher, monkeypatch):
    spec = write_shards(tmp_path / "wds")
    data = TarPairs(spec)
    ident = [teacher_identity(teacher)]
    options = CacheConfig(batch_size=4, shard_rows=8, workers=0)
    build_cache(tmp_path / "cache", [teacher], data, [["en"]], ident, options, progress=False)

    reads, hashes = [], []
    raw, sha = TarPairs.raw, wds_mod.file_sha256
    monkeypatch.setattr(TarPairs, "raw", lambda self, i: (reads.append(i), raw(self, i))[1])
    monkeypatch.setattr(wds_mod, "file_sha256", lambda p: (hashes.append(p), sha(p))[1])
    fresh = TarPairs(spec)
    CachedTeachers(tmp_path / "cache", fresh, ident, [["en"]], options)
    assert reads == [] and hashes == []  # opening compared the stored shard list: no row, no shard read

    os.utime(tmp_path / "wds" / "002.tar")  # a copy: new times, same bytes: hashed again, accepted, no row read
    CachedTeachers(tmp_path / "cache", TarPairs(spec), ident, [["en"]], options)
    assert reads == [] and [p.name for p in hashes] == ["002.tar"]

    write_shards(tmp_path / "wds", change={(1, 3): caption(1, 3).replace("number", "NUMBER")})  # same length
    with pytest.raises(CacheError, match="lacks rows for 1 of the 24 training samples"):
        CachedTeachers(tmp_path / "cache", TarPairs(spec), ident, [["en"]], options)


def test_tar_pairs_keep_the_index_of_a_few_shards_only(tmp_path, monkeypatch):
    spec = write_shards(tmp_path / "wds", shards=4, per_shard=5)
    expected = [(item["captions"], item["label"], item["image"].tobytes()) for item in TarPairs(spec)]
    monkeypatch.setattr(TarPairs, "INDEXED_SHARDS", 1)
    data = TarPairs(spec)
    assert len(data._indexed) == 1 and data.shard_rows == [5, 5, 5, 5]  # one shard's index after opening
    order = [19, 0, 7, 18, 3, 12, 19]  # back and forth over the shards: each read re-indexes its shard as needed
    got = [(data[i]["captions"], data[i]["label"], data[i]["image"].tobytes()) for i in order]
    assert got == [expected[i] for i in order] and len(data._indexed) == 1
    assert data[7]["captions"] == {"en": caption(1, 2)}

    write_shards(tmp_path / "wds", shards=4, per_shard=6)  # the shards change under an open dataset
    with pytest.raises(DataError, match=r"000\.tar: 6 samples now, 5 when the data was opened"):
        data[0]


def test_a_cache_of_the_data_it_was_built_on_keeps_no_row_table(tmp_path, teacher):
    spec = write_shards(tmp_path / "wds")
    ident = [teacher_identity(teacher)]
    options = CacheConfig(batch_size=4, shard_rows=5, workers=0)
    build_cache(tmp_path / "cache", [teacher], TarPairs(spec), [["en"]], ident, options, progress=False)
    same = CachedTeachers(tmp_path / "cache", TarPairs(spec), ident, [["en"]], options)
    assert same._rows.found is None  # row i is cached row i: found by arithmetic, nothing held per row
    shard, offset = same._rows[torch.tensor([0, 4, 5, 23]).numpy()]
    assert shard.tolist() == [0, 0, 1, 4] and offset.tolist() == [0, 4, 0, 3]
    part = CachedTeachers(tmp_path / "cache", TarPairs(spec, limit=20), ident, [["en"]], options)
    assert part._rows.found is not None and len(part._rows) == 20  # a subset: its rows found by content
    batch = {"index": torch.tensor([19, 0, 7])}
    a, b = same(batch, frozenset({"teacher"}))[0], part(batch, frozenset({"teacher"}))[0]
    assert torch.equal(a.image, b.image) and torch.equal(a.text["en"], b.text["en"])
