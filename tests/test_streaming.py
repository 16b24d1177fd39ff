"""Streaming training sources (webdataset tar shards, streaming Hugging Face datasets): each process and DataLoader
worker reads only its own shards, the order is reshuffled per epoch with the seed, a resumed stream replays the very
batches of an uninterrupted one, nothing per sample is held, and training from a teacher cache finds every streamed
sample's cached row."""

from __future__ import annotations

import itertools
import json
import pickle

import pytest
import torch

from test_webdataset import COLORS, caption, write_shards
from vldistill.cache import CachedTeachers, read_manifest, teacher_identity
from vldistill.config import CacheConfig, ConfigError, load_recipe
from vldistill.data.hf import HfStream
from vldistill.data.pairs import DataError
from vldistill.data.sources import load_stream, streams
from vldistill.data.streaming import StreamBatches
from vldistill.data.webdataset import TarPairs, TarStream
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train import loop
from vldistill.train.fit import cache_recipe, fit_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def epoch_keys(stream, seed, rank, world, worker, workers, epoch=0):
    """The (shard, position) pairs one worker reads in one epoch."""
    out = []
    for _, shard, position, e in stream.worker_samples(seed, 0, rank, world, worker, workers):
        if e > epoch:
            return out
        if e == epoch:
            out.append((shard, position))
    return out


def test_each_process_and_worker_reads_only_its_own_shards_and_epochs_reshuffle(tmp_path):
    stream = TarStream(write_shards(tmp_path, shards=8, per_shard=5), shuffle_buffer=4)
    reads = {(r, w): epoch_keys(stream, 3, r, 2, w, 2) for r in range(2) for w in range(2)}
    shards = {k: {s for s, _ in v} for k, v in reads.items()}
    assert all(len(s) == 2 for s in shards.values())  # 8 shards over 2 processes x 2 workers
    assert set().union(*shards.values()) == set(range(8)) and sum(len(s) for s in shards.values()) == 8  # disjoint
    everything = sorted(k for v in reads.values() for k in v)
    assert everything == [(s, p) for s in range(8) for p in range(5)]  # every sample once per epoch
    assert epoch_keys(stream, 3, 0, 2, 0, 2) == reads[(0, 0)]  # the seed fixes the order
    assert epoch_keys(stream, 3, 0, 1, 0, 1, epoch=1) != epoch_keys(stream, 3, 0, 1, 0, 1, epoch=0)  # reshuffled
    assert epoch_keys(stream, 4, 0, 1, 0, 1) != epoch_keys(stream, 3, 0, 1, 0, 1)
    with pytest.raises(DataError, match=r"8 shards cannot be split over 3 processes x 3 DataLoader workers"):
        next(stream.worker_samples(0, 0, 0, 3, 0, 3))


def test_streamed_items_are_the_map_style_rows_and_hold_nothing_per_sample(tmp_path):
    spec = write_shards(tmp_path / "a", shards=3, per_shard=8)
    stream, rows = TarStream(spec), TarPairs(spec)
    items = list(stream)
    assert [i["index"] for i in items] == list(range(24)) and len(stream) == 24
    assert items[13]["captions"] == rows[13]["captions"] == {"en": caption(1, 5)} and items[13]["label"] == 1
    assert items[13]["key"] == "001.tar/0010005" and items[13]["image"].tobytes() == rows[13]["image"].tobytes()
    assert stream.shard_fingerprint() == rows.shard_fingerprint()  # the same shards, the same fingerprint
    assert [r["rows"] for r in rows.shard_fingerprint()] == [8, 8, 8]
    big = TarStream(write_shards(tmp_path / "b", shards=3, per_shard=400))
    big.shard_counts()
    assert len(pickle.dumps(big)) < len(pickle.dumps(stream)) + 200  # 50x the samples: the same state per worker


def micro_batches(stream, start, count, workers, batch_size=4):
    """``count`` micro-batches from ``start`` on, as the trainer's DataLoader gives them."""
    loader = torch.utils.data.DataLoader(
        StreamBatches(stream, batch_size, 7, 0, start, 0, 1, 1),
        batch_size=None,
        collate_fn=lambda items: [i["index"] for i in items],
        num_workers=workers,
    )
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_replays_the_batches_of_an_uninterrupted_one(tmp_path, workers):
    stream = TarStream(write_shards(tmp_path, shards=4, per_shard=6), shuffle_buffer=5)
    whole = micro_batches(stream, 0, 16, workers)  # 64 samples: over two epochs of 24
    assert sorted(i for b in whole[:6] for i in b) == list(range(24))  # the first epoch: each sample once
    for start in (3, 7, 13):
        assert micro_batches(stream, start, 16 - start, workers) == whole[start:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Shards, a tokenizer and a frozen teacher."""
    root = tmp_path_factory.mktemp("stream")
    spec = write_shards(root / "wds", shards=4, per_shard=8)
    torch.manual_seed(5)
    tok = train_wordpiece([caption(s, i) for s in range(4) for i in range(8)], vocab_size=120)
    teacher_dir = root / "teacher"
    build_student("test-clip", tok, projection_dim=24, **{"vision.hidden_size": 48}).save_pretrained(teacher_dir)
    return spec, teacher_dir, root


def stream_recipe(spec, out, teacher_dir, cache=None, steps=4, **data):
    return load_recipe(raw=stream_raw(spec, out, teacher_dir, cache, steps, **data))


def stream_raw(spec, out, teacher_dir, cache=None, steps=4, **data):
    teacher = {"name_or_path": str(teacher_dir), "languages": ["en"]}
    if cache:
        teacher.update(source="cache", cache=str(cache))
    raw = {
        "name": "stream",
        "student": {"preset": "test-clip"},
        "teacher": teacher,
        "cache": {"batch_size": 4, "shard_rows": 8, "workers": 0},
        "data": {"train": spec, "eval": None, "languages": ["en"], "shuffle_buffer": 6, **data},
        "stages": [{"steps": steps, "losses": ["clip", "fd"]}],
        "train": {"batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2},
    }
    raw["train"].update(progress=False, tensorboard=False, output_dir=str(out))
    return raw


def losses(result_dir):
    return [json.loads(line)["loss"] for line in (result_dir / "metrics.jsonl").read_text().splitlines()]


def test_fit_streams_tar_shards_from_a_cache_and_a_resumed_run_matches(tiny, monkeypatch, fresh_accelerate_state):
    spec, teacher_dir, root = tiny
    assert streams(spec, None) and not streams("bundled:easyvqa", None) and not streams(spec, False)
    cache_recipe(stream_recipe(spec, root / "unused", teacher_dir, root / "cache"))  # map-style: TarPairs
    manifest = read_manifest(root / "cache")
    assert [s["rows"] for s in manifest["source_shards"]] == [8, 8, 8, 8]

    # a stream opens the cache by the counts and fingerprint its manifest stores: no shard scanned, hashed or read
    stream = load_stream(spec, languages=["en"]).dataset
    assert stream.adopt_counts(manifest["source_shards"]) == 4
    with monkeypatch.context() as m:
        m.setattr("vldistill.data.webdataset._index_shard", lambda *a: pytest.fail("a shard was scanned"))
        m.setattr("vldistill.data.webdataset.file_sha256", lambda *a: pytest.fail("a shard was hashed"))
        m.setattr(TarStream, "row_digests", lambda *a: pytest.fail("rows were read"))
        ident = [teacher_identity(None, str(teacher_dir))]
        by_stream = CachedTeachers(root / "cache", stream, ident, [["en"]], CacheConfig())
    by_rows = CachedTeachers(root / "cache", TarPairs(spec), ident, [["en"]], CacheConfig())
    batch = {"index": torch.tensor([item["index"] for item in list(stream)[5:9]])}
    need = frozenset({"teacher"})
    assert torch.equal(by_stream(batch, need)[0].image, by_rows(batch, need)[0].image)

    whole = fit_recipe(stream_recipe(spec, root / "whole", teacher_dir, root / "cache"), evaluate_after=False)
    assert whole["final"]["step"] == 4
    part = stream_recipe(spec, root / "part", teacher_dir, root / "cache")
    real_tqdm = loop.tqdm

    steps = itertools.count(1)

    def crash(n=1):
        if next(steps) == 3:
            raise KeyboardInterrupt  # killed after step 3, after the checkpoint of step 2

    def crashing_tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        bar.update = crash
        return bar

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(loop, "tqdm", crashing_tqdm)
        fit_recipe(part, evaluate_after=False)
    assert fit_recipe(part, resume=True, evaluate_after=False)["final"]["step"] == 4
    assert losses(root / "part") == pytest.approx(losses(root / "whole"), rel=1e-5)


def test_streamed_sources_refuse_selection_by_index(tiny, fresh_accelerate_state):
    spec, teacher_dir, root = tiny
    with pytest.raises(ConfigError, match=r"data.paired = 8.0: the training data .* is streamed"):
        fit_recipe(stream_recipe(spec, root / "p", teacher_dir, paired=8), evaluate_after=False)
    with pytest.raises(DataError, match=r"data.streaming: true: 'x.jsonl' cannot be streamed"):
        streams("x.jsonl", True)
    with pytest.raises(ConfigError, match="shuffle_buffer = -1"):
        stream_recipe(spec, root / "q", teacher_dir, shuffle_buffer=-1)


def write_parquet(directory, files=4, rows=6):
    """A Hugging Face dataset as parquet files (one stream shard each), images stored as PNG bytes."""
    import io

    import datasets
    from PIL import Image

    directory.mkdir(parents=True)
    for f in range(files):
        images = []
        for i in range(rows):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), COLORS[(f + i) % 4]).save(buf, "PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
        features = datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.Value("int64")}
        )
        table = {"image": images, "text": [caption(f, i) for i in range(rows)], "label": [i % 4 for i in range(rows)]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(directory / f"part-{f}.parquet"))
    return directory


def test_a_streaming_hf_dataset_is_split_by_its_files_and_trains(tiny, tmp_path, fresh_accelerate_state):
    spec = f"hf:{write_parquet(tmp_path / 'pq')}"
    assert not streams(spec, None) and streams(spec, True)
    stream = load_stream(spec, languages=["en"], shuffle_buffer=3).dataset
    assert isinstance(stream, HfStream) and stream.n_shards == 4 and stream.languages == ["en"]
    items = list(stream)
    assert sorted(i["captions"]["en"] for i in items) == sorted(caption(f, i) for f in range(4) for i in range(6))
    first = next(i for i in items if i["captions"]["en"] == caption(2, 1))
    assert first["image"].getpixel((0, 0)) == (255, 255, 0) and first["label"] == 1  # COLORS[3]
    assert first["index"] == (2 << 40) + 1 and first["key"].endswith("[2]#1")  # counts unknown: shard and position
    reads = [{s for _, s, _, e in _first_epoch(stream, r, w)} for r in range(2) for w in range(2)]
    assert all(len(r) == 1 for r in reads) and set().union(*reads) == {0, 1, 2, 3}  # one file per worker
    assert len(stream) == 24

    teacher_dir = tiny[1]
    cfg = stream_recipe(spec, tmp_path / "run", teacher_dir, steps=2, streaming=True)
    assert fit_recipe(cfg, evaluate_after=False)["final"]["step"] == 2


def _first_epoch(stream, rank, worker):
    for entry in stream.worker_samples(0, 0, rank, 2, worker, 2):
        if entry[3] > 0:
            return
        yield entry


def test_a_cache_is_built_from_a_streaming_hf_dataset_and_trains_from_it(tiny, tmp_path, fresh_accelerate_state):
    from vldistill.cache import CacheError
    from vldistill.data.streaming import StreamRows

    directory = write_parquet(tmp_path / "pq", files=4, rows=6)
    spec, teacher_dir = f"hf:{directory}", tiny[1]
    cfg = stream_recipe(spec, tmp_path / "run", teacher_dir, tmp_path / "cache", steps=2, streaming=True)
    built = cache_recipe(cfg)  # read in order through StreamRows: each shard counted, then read once
    manifest = read_manifest(tmp_path / "cache")
    assert built["rows"] == 24 and manifest["source_shards"] == [{"shard": i, "rows": 6} for i in range(4)]
    mapped = stream_recipe(spec, tmp_path / "run2", teacher_dir, tmp_path / "cache-map", streaming=False)
    cache_recipe(mapped)  # the same data read map-style: the same rows, digests and fingerprint
    assert read_manifest(tmp_path / "cache-map")["dataset"]["fingerprint"] == manifest["dataset"]["fingerprint"]

    rows = StreamRows(load_stream(spec, languages=["en"]).dataset)
    assert len(rows) == 24 and rows[13]["index"] == 13 and rows[13]["captions"] == {"en": caption(2, 1)}
    whole = rows.row_digests(["en"])
    assert (rows.row_digests(["en"], range(5, 17)) == whole[5:17]).all()  # one process's share: only its shards
    with pytest.raises(DataError, match="contiguous range of rows"):
        rows.row_digests(["en"], [1, 3])
    assert rows[2]["captions"] == {"en": caption(0, 2)}  # back to an earlier shard: reopened and skipped

    stream = load_stream(spec, languages=["en"], shuffle_buffer=3).dataset
    assert stream.adopt_counts(manifest["source_shards"]) == 4
    assert sorted(i["index"] for i in stream) == list(range(24))  # the cache's rows, not shard << 40
    assert fit_recipe(cfg, evaluate_after=False)["final"]["step"] == 2  # trains from the cache, streaming

    write_parquet(tmp_path / "pq2", files=4, rows=6)
    (tmp_path / "pq2" / "part-3.parquet").replace(directory / "part-3.parquet")  # same data: still accepted
    changed = tmp_path / "changed"
    write_parquet(changed, files=4, rows=6)
    (changed / "part-3.parquet").unlink()
    write_parquet(tmp_path / "one", files=1, rows=7)  # shard 3 now holds 7 samples
    (tmp_path / "one" / "part-0.parquet").replace(changed / "part-3.parquet")
    moved = load_stream(f"hf:{changed}", languages=["en"]).dataset
    moved.adopt_counts(manifest["source_shards"])
    ident = [teacher_identity(None, str(teacher_dir))]
    with pytest.raises(DataError, match=r"shard 3 holds 7 samples, the teacher cache's manifest says 6"):
        CachedTeachers(tmp_path / "cache", moved, ident, [["en"]], CacheConfig(batch_size=4, shard_rows=8))
    with pytest.raises(CacheError):
        CachedTeachers(tmp_path / "cache", load_stream(f"hf:{changed}", languages=["en"]).dataset, ident, [["en"]],
                       CacheConfig(batch_size=4, shard_rows=8))  # fmt: skip


def test_two_processes_train_from_a_stream_each_reading_its_own_shards(tiny, tmp_path):
    """``torchrun`` with two CPU processes (gloo) training from tar shards streamed against a cache: each process reads
    the shards its rank is dealt in an epoch, none of the other's, and together every shard."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    spec, teacher_dir, root = tiny
    cache_recipe(stream_recipe(spec, tmp_path / "unused", teacher_dir, root / "cache-2p"))
    raw = stream_raw(spec, tmp_path / "run", teacher_dir, root / "cache-2p", steps=3)  # 2 samples a process a step
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    record = tmp_path / "reads.jsonl"
    fault = Path(__file__).resolve().parent / "fault_child.py"
    spy = {"record": {"target": "vldistill.data.streaming:ShardStream._buffered", "file": str(record)}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(fault)]
    cmd += [json.dumps(spy), "--", "fit", str(recipe), "--train.progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLDISTILL_WORKERS": "0"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reads = [json.loads(line) for line in record.read_text().splitlines()]
    first = {r["rank"]: r["arg"] for r in reversed(reads)}  # each process's first epoch
    assert sorted(first) == [0, 1] and not set(first[0]) & set(first[1])
    assert sorted(first[0] + first[1]) == [0, 1, 2, 3]  # 4 shards: two each
    seed = load_recipe(raw=raw).train.seed
    assert first[0] == TarStream(spec).share(seed, 0, 0, 0, 2, 0, 1) and len(losses(tmp_path / "run")) == 3
