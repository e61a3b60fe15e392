"""store: the partial folder (write, resume, crash leftovers), the cache file (read, refuse), head files."""
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.checks import data_checks
from pipeline.errors import CacheError, IncompleteCacheError
from pipeline.sources import Batch
from pipeline.store import (CACHE_FORMAT, HEAD_FORMAT, FeatureCache, PartialCache, Reuse, partial, partial_path,
                            read_cache_settings, read_head, read_partial_settings, write_head)

REPO = Path(__file__).resolve().parents[1]
N = 11
IDS = ["images/café.jpg", "images/b.jpg", "images/日本.png"] + [f"images/{i}.jpg" for i in range(3, N)]
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1], dtype=np.int64)
SPLIT = ["train", "val", "test", "train", "train", "val", "test", "train", "train", "train", "test"]
CLASS_NAMES = ["bus", "car", "ámbulance"]
DIMS = {"pool": 6, "mid": 3}
SETTINGS = {"dataset": "veh", "model": "mobilenet_v2", "precision": "fp32", "layers": ["pool", "mid"]}
ATTRS = {"settings": SETTINGS, "model": "mobilenet_v2", "pooling": {"pool": "avg", "mid": "max"},
         "versions": {"numpy": "2.0"}, "batch_size": 32, "images_per_s": 12.5, "complete_note": "[not json",
         "transform": "Resize(256) CenterCrop(224)"}
LAYER_ATTRS = {"pool": {"node": "classifier.0", "pooling": "avg", "raw_shape": [6]},
               "mid": {"node": "features.3", "pooling": "max", "raw_shape": (3, 4, 4)}}


def mentions(*fragments):
    """A `match=` pattern for a message holding every fragment, in any order."""
    return r"(?s)\A" + "".join(f"(?=.*{re.escape(str(fragment))})" for fragment in fragments)


def codes(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((N, d)).astype(np.float32) for name, d in DIMS.items()}


def create(path, **overrides):
    kwargs = dict(ids=IDS, labels=LABELS, split=SPLIT, class_names=CLASS_NAMES,
                  layer_dims={name: (d, LAYER_ATTRS[name]) for name, d in DIMS.items()}, attrs=ATTRS)
    kwargs.update(overrides)
    return PartialCache.create(path, **kwargs)


def append(writer, values, sha256=None, failures=None):
    """Append the codes `values` as the batch of the next rows of `todo`, as many as `values` holds."""
    first, count = writer.n_done, len(next(iter(values.values())))
    writer.append(Batch(writer.todo[first:first + count], None, sha256 or [""] * count, failures or [""] * count),
                  values)


def append_rows(writer, values, start, stop, batch=4):
    for lo in range(start, stop, batch):
        hi = min(lo + batch, stop)
        append(writer, {name: v[lo:hi] for name, v in values.items()})


def build_cache(path, values=None, batch=4, finish_attrs=None):
    values = codes() if values is None else values
    writer = create(path)
    append_rows(writer, values, 0, N, batch)
    writer.finish(finish_attrs or {"seconds": 1.5, "device": "cpu: test"})
    return values


def interrupted(path, stop, values=None):
    """A partial folder for `path` whose extraction stopped after `stop` rows; its writer."""
    writer = create(path)
    append_rows(writer, codes() if values is None else values, 0, stop)
    return writer


def partial_files(path):
    return sorted(p.name for p in partial_path(path).iterdir())


# ---------------------------------------------------------------------------
# Round trip


def test_round_trip_rows_labels_ids_split(tmp_path):
    path = tmp_path / "veh" / "m.h5"
    values = build_cache(path, batch=4)  # batches of 4, 4, 3
    with FeatureCache(path) as cache:
        assert sorted(cache.layers) == ["mid", "pool"]
        for name in DIMS:
            got, labels = cache.features(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, values[name])
            np.testing.assert_array_equal(labels, LABELS)
        np.testing.assert_array_equal(cache.labels, LABELS)
        assert list(cache.ids) == IDS
        assert cache.ids[0] == "images/café.jpg" and isinstance(cache.ids[0], str)
        assert list(cache.split) == SPLIT
        assert cache.class_names == CLASS_NAMES


def test_round_trip_attrs_types(tmp_path):
    path = tmp_path / "m.h5"
    build_cache(path)
    with FeatureCache(path) as cache:
        a = cache.attrs
        assert a["settings"] == SETTINGS                      # JSON -> dict
        assert a["pooling"] == {"pool": "avg", "mid": "max"}
        assert a["versions"] == {"numpy": "2.0"}
        assert a["class_names"] == CLASS_NAMES               # JSON -> list
        assert a["model"] == "mobilenet_v2" and isinstance(a["model"], str)
        assert a["transform"] == "Resize(256) CenterCrop(224)"
        assert a["complete_note"] == "[not json"              # looks like JSON, is not: kept as text
        assert a["batch_size"] == 32 and isinstance(a["batch_size"], int)
        assert a["images_per_s"] == 12.5 and isinstance(a["images_per_s"], float)
        assert a["seconds"] == 1.5 and a["device"] == "cpu: test"  # from finish()
        assert a["format"] == CACHE_FORMAT
        assert a["complete"] is True
        assert a["n_rows"] == N and a["n_skipped"] == 0


def test_round_trip_layer_attrs(tmp_path):
    path = tmp_path / "m.h5"
    build_cache(path)
    with FeatureCache(path) as cache:
        assert cache.layer_attrs("pool") == {"node": "classifier.0", "pooling": "avg", "raw_shape": [6]}
        assert cache.layer_attrs("mid") == {"node": "features.3", "pooling": "max", "raw_shape": [3, 4, 4]}


def test_per_row_text_is_read_compactly_and_by_rows(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.cache._TEXT_ROWS", 4)  # several blocks of rows
    path = tmp_path / "veh" / "m.h5"
    build_cache(path)
    with FeatureCache(path) as cache:
        assert cache.split.dtype.kind == "U" and list(cache.split) == SPLIT  # no Python string per row
        assert cache.ids_of([0, 2, 7]) == [IDS[0], IDS[2], IDS[7]] and cache.ids_of([]) == []


def test_rows_sharing_content_finds_every_duplicate(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.cache._TEXT_ROWS", 4)  # duplicates in different blocks
    a, b, c = "a" * 64, "0123456789abcdef" + "1" * 48, "0123456789abcdef" + "2" * 48  # b, c: same first 16 digits
    sha = [a, "", c, "f" * 64, a, "", b, "e" * 64, "d" * 64, a, "9" * 64]
    path = tmp_path / "veh" / "m.h5"
    writer = create(path)
    for lo in range(0, N, 4):
        hi = min(lo + 4, N)
        append(writer, {name: v[lo:hi] for name, v in codes().items()}, sha256=sha[lo:hi])
    writer.finish({})
    with FeatureCache(path) as cache:
        candidates = cache.rows_sharing_content()
        assert list(candidates) == [0, 2, 4, 6, 9]  # a three times; b and c share a key, not a hash; "" never
        assert cache.sha256_of(candidates) == [a, c, a, b, a]
        checks = data_checks(cache)
    assert checks["n_duplicate_groups"] == 1 and checks["groups"][0]["ids"] == [IDS[0], IDS[4], IDS[9]]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_features_of_one_split_in_order(tmp_path, split):
    path = tmp_path / "m.h5"
    values = build_cache(path)
    rows = [i for i, s in enumerate(SPLIT) if s == split]
    with FeatureCache(path) as cache:
        got, labels = cache.features("pool", split)
    np.testing.assert_array_equal(got, values["pool"][rows])
    np.testing.assert_array_equal(labels, LABELS[rows])


def test_layers_are_chunked_and_not_resizable(tmp_path):
    path = tmp_path / "m.h5"
    build_cache(path)
    with h5py.File(path, "r") as h5:
        for name, d in DIMS.items():
            ds = h5["layers"][name]
            assert ds.shape == (N, d)
            assert ds.maxshape == ds.shape
            assert ds.chunks is not None and ds.chunks[1] == d


@pytest.mark.parametrize("dim", [1, 64, 512, 1280, 25088])
def test_chunk_size_within_h5py_advice(tmp_path, dim):
    """A layer of at least 10 KiB (rows enough) is stored in chunks of 10 KiB to 1 MiB of whole rows, and of
    at most 16 rows where 16 rows reach 10 KiB (a streamed class-sorted cache mixes by chunks)."""
    path = tmp_path / "m.h5"
    n = max(-(-10 * 1024 // (4 * dim)), 64)
    writer = PartialCache.create(path, ids=[str(i) for i in range(n)], labels=[0] * n, split=["train"] * n,
                                 class_names=["x"], layer_dims={"l": (dim, {})}, attrs={})
    append(writer, {"l": np.zeros((n, dim), np.float32)})
    writer.finish({})
    with h5py.File(path, "r") as h5:
        chunks = h5["layers"]["l"].chunks
    assert chunks[1] == dim
    assert 10 * 1024 <= 4 * chunks[0] * dim <= 1024 * 1024
    assert chunks[0] <= 16 or 4 * 16 * dim < 10 * 1024


@pytest.mark.parametrize("piece, middle", [(16, 16), (4, 20)])  # whole chunks (read as stored), or less
def test_read_pieces_gives_the_rows_of_each_piece(tmp_path, piece, middle):
    path, n, dim = tmp_path / "m.h5", 40, 2048  # chunks of 16 rows: 16, 16 and a last one of 8
    values = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    writer = PartialCache.create(path, ids=[str(i) for i in range(n)], labels=[0] * n, split=["train"] * n,
                                 class_names=["x"], layer_dims={"l": (dim, {})}, attrs={})
    append(writer, {"l": values})
    writer.finish({})
    with FeatureCache(path) as cache:
        assert cache.h5["layers"]["l"].chunks == (16, dim)
        rows, X = cache.read_pieces("l", np.array([32, 0, middle]), piece)  # the last piece is short
    expected = np.concatenate([np.arange(0, piece), np.arange(middle, middle + piece),
                               np.arange(32, 32 + min(piece, 8))])
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(X, values[expected])


# ---------------------------------------------------------------------------
# The partial folder: interruption and resume


def test_final_file_appears_only_on_finish(tmp_path):
    path = tmp_path / "m.h5"
    values = codes()
    writer = create(path)
    assert partial_path(path).exists() and not path.exists()
    append_rows(writer, values, 0, N)
    assert writer.n_done == N
    assert not path.exists()
    writer.finish({})
    assert path.exists() and not partial_path(path).exists()


def test_reading_an_interrupted_cache_says_how_to_resume(tmp_path):
    path = tmp_path / "m.h5"
    interrupted(path, 4)
    with pytest.raises(IncompleteCacheError,
                       match=mentions("4 of 11", "re-run the same `make extract`", "resume", path)):
        FeatureCache(path)


def test_reading_while_the_writer_is_still_open(tmp_path):
    path = tmp_path / "m.h5"
    interrupted(path, 8)
    with pytest.raises(IncompleteCacheError, match="8 of 11"):
        FeatureCache(path)


@pytest.mark.parametrize("rows", [[5, 6, 7], [0, 1, 2], [4, 5, 6, 7, 8, 9, 10, 11]], ids=["gap", "again", "beyond"])
def test_a_batch_must_hold_the_next_rows_to_compute(tmp_path, rows):
    path = tmp_path / "m.h5"
    writer = interrupted(path, 4)
    before = partial_files(path)
    values = {name: np.zeros((len(rows), d), np.float32) for name, d in DIMS.items()}
    with pytest.raises(CacheError, match=re.escape("is not the next of the 11 rows to compute (row 4 is)")):
        writer.append(Batch(np.array(rows, dtype=np.int64), None, [""] * len(rows), [""] * len(rows)), values)
    assert writer.n_done == 4 and partial_files(path) == before


def test_resume_continues_and_equals_uninterrupted(tmp_path):
    values = codes(5)
    whole = tmp_path / "whole.h5"
    build_cache(whole, values, batch=5, finish_attrs={"seconds": 2.0})

    path = tmp_path / "resumed.h5"
    writer = create(path)
    append_rows(writer, values, 0, 7, batch=3)  # batches of 3, 3, 1
    writer = PartialCache.resume(path)
    assert writer.n_done == 7
    assert writer.settings == SETTINGS
    append_rows(writer, values, 7, N, batch=3)
    writer.finish({"seconds": 2.0})

    with FeatureCache(whole) as a, FeatureCache(path) as b:
        for name in DIMS:
            np.testing.assert_array_equal(a.features(name)[0], b.features(name)[0])
        np.testing.assert_array_equal(a.labels, b.labels)
        assert list(a.ids) == list(b.ids) and list(a.split) == list(b.split)
        assert a.attrs == b.attrs


def test_resume_ignores_what_a_kill_mid_write_leaves(tmp_path):
    """A temporary file (killed before its rename) and a batch that does not follow on are dropped."""
    values = codes(2)
    path = tmp_path / "m.h5"
    interrupted(path, 4, values)
    folder = partial_path(path)
    (folder / "batch-0000000004-0000004.npz.tmp").write_bytes(b"half a batch")
    np.savez(folder / "batch-0000000009-0000002.npz", rows=np.array([9, 10]))  # a gap before it
    writer = PartialCache.resume(path)
    assert writer.n_done == 4
    assert partial_files(path) == ["batch-0000000000-0000004.npz", "meta.json", "table.npz"]
    append_rows(writer, values, 4, N)
    writer.finish({})
    assert not folder.exists()
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.features("pool")[0], values["pool"])
        np.testing.assert_array_equal(cache.features("mid")[0], values["mid"])


def test_skipped_rows_leave_the_cache_and_no_label_moves(tmp_path):
    """Rows that failed to decode and rows the listing skipped are in /skipped, not in the layers."""
    values = codes(4)
    path = tmp_path / "m.h5"
    writer = create(path, stamps=[f"{i}:1" for i in range(N)], skipped=[("images/gone.jpg", "no such file")])
    failures = [""] * N
    failures[2], failures[7] = "truncated image data", "not an image (cannot identify format)"
    for lo in range(0, N, 4):
        hi = min(lo + 4, N)
        append(writer, {name: v[lo:hi] for name, v in values.items()},
               sha256=[f"h{i}" for i in range(lo, hi)], failures=failures[lo:hi])
    writer.finish({})
    kept = [i for i in range(N) if not failures[i]]
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.features("pool")[0], values["pool"][kept])
        np.testing.assert_array_equal(cache.labels, LABELS[kept])
        assert list(cache.ids) == [IDS[i] for i in kept] and list(cache.split) == [SPLIT[i] for i in kept]
        assert list(cache.sha256) == [f"h{i}" for i in kept]
        assert list(cache.stamps) == [f"{i}:1" for i in kept]
        assert cache.skipped == [("images/gone.jpg", "no such file"), (IDS[2], "truncated image data"),
                                 (IDS[7], "not an image (cannot identify format)")]
        assert cache.attrs["n_rows"] == N - 2 and cache.attrs["n_skipped"] == 3


def test_reused_rows_are_copied_from_the_old_cache(tmp_path):
    """An update computes some rows and copies the others, in the new order."""
    old_values = codes(6)
    old = tmp_path / "old.h5"
    build_cache(old, old_values)
    new_ids = [IDS[5], "images/new.jpg", IDS[0], IDS[3]]  # row 1 is new, the rest come from the old cache
    fresh = {name: np.full((1, d), 7.0, np.float32) for name, d in DIMS.items()}
    with FeatureCache(old) as cache:
        reuse = Reuse.from_cache(cache, rows=[0, 2, 3], from_rows=[5, 0, 3])
    path = tmp_path / "new.h5"
    writer = create(path, ids=new_ids, labels=[1, 0, 2, 1], split=["test", "train", "val", "train"],
                    todo=[1], reuse=reuse)
    append(writer, fresh)
    writer.finish({})
    with FeatureCache(path) as cache:
        for name in DIMS:
            got = cache.features(name)[0]
            np.testing.assert_array_equal(got[[0, 2, 3]], old_values[name][[5, 0, 3]])
            np.testing.assert_array_equal(got[1], fresh[name][0])
        assert list(cache.ids) == new_ids and list(cache.labels) == [1, 0, 2, 1]


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_batch_keeps_what_was_written(tmp_path, monkeypatch):
    values = codes(8)
    path = tmp_path / "m.h5"
    writer = interrupted(path, 4, values)

    def full(f, **arrays):
        f.write(b"partly")
        disk_full()

    with monkeypatch.context() as m:
        m.setattr(np, "savez", full)
        with pytest.raises(CacheError, match=mentions("disk full", "re-run the same command to resume")):
            append(writer, {name: v[4:8] for name, v in values.items()})
        assert not list(partial_path(path).glob("*.tmp"))
    writer = PartialCache.resume(path)  # space is back
    assert writer.n_done == 4
    append_rows(writer, values, 4, N)
    writer.finish({})
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.features("pool")[0], values["pool"])


def test_disk_full_while_assembling_keeps_every_batch(tmp_path, monkeypatch):
    values = codes(9)
    path = tmp_path / "m.h5"
    writer = interrupted(path, N, values)
    with monkeypatch.context() as m:
        m.setattr(partial, "write_rows", disk_full)  # what assembling writes the codes with
        with pytest.raises(CacheError, match="disk full while assembling"):
            writer.finish({})
    assert not path.exists() and not path.with_name("m.h5.assembling").exists()
    writer = PartialCache.resume(path)
    assert writer.n_done == N
    writer.finish({})
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.features("mid")[0], values["mid"])


def test_create_over_an_old_partial_starts_afresh(tmp_path):
    path = tmp_path / "m.h5"
    interrupted(path, 4, codes(1))
    writer = create(path)
    assert writer.n_done == 0
    values = codes(3)
    append_rows(writer, values, 0, N)
    writer.finish({})
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.features("pool")[0], values["pool"])


# ---------------------------------------------------------------------------
# Refusals


def test_finish_with_rows_missing(tmp_path):
    path = tmp_path / "m.h5"
    writer = interrupted(path, 8)
    with pytest.raises(CacheError, match="8 of 11"):
        writer.finish({})
    assert not path.exists()
    with pytest.raises(IncompleteCacheError):
        FeatureCache(path)


def test_unknown_layer_lists_the_layers(tmp_path):
    path = tmp_path / "m.h5"
    build_cache(path)
    with FeatureCache(path) as cache:
        with pytest.raises(CacheError, match=mentions("'features.99'", "pool", "mid")):
            cache.features("features.99")


def test_no_cache_at_all(tmp_path):
    with pytest.raises(CacheError, match="make extract") as e:
        FeatureCache(tmp_path / "none.h5")
    assert not isinstance(e.value, IncompleteCacheError)


def test_non_hdf5_file_is_a_cache_error(tmp_path):
    path = tmp_path / "m.h5"
    path.write_bytes(b"this is not an HDF5 file\n" * 20)
    with pytest.raises(CacheError, match=mentions(path, "delete it", "make extract")) as e:
        FeatureCache(path)
    assert not isinstance(e.value, OSError)


def test_hdf5_without_format_is_refused(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["complete"] = True
        h5.create_dataset("labels", data=np.zeros(3, np.int64))
    with pytest.raises(CacheError, match=mentions(CACHE_FORMAT, "make extract")):
        FeatureCache(path)


def test_hdf5_with_other_format_is_refused(tmp_path):
    path = tmp_path / "m.h5"
    write_head(path, coef=np.ones((2, 3)), intercept=np.zeros(2), scaler_mean=np.zeros(3),
               scaler_scale=np.ones(3), attrs={})
    with pytest.raises(CacheError, match="not a complete"):
        FeatureCache(path)


def test_incomplete_file_under_the_final_name_is_refused(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as h5:  # e.g. copied while an older version was writing it
        h5.attrs["format"] = CACHE_FORMAT
        h5.attrs["complete"] = False
    with pytest.raises(CacheError, match=mentions("not a complete", "delete it")):
        FeatureCache(path)

    other = tmp_path / "o.h5"
    interrupted(other, 5)
    os.replace(partial_path(other), other)  # someone renamed a .partial folder by hand
    with pytest.raises(CacheError, match="is a folder"):
        FeatureCache(other)


def test_corrupt_partial_is_a_cache_error(tmp_path):
    path = tmp_path / "m.h5"
    partial_path(path).write_bytes(b"\x89HDF\r\n\x1a\n truncated by a crash" * 10)
    with pytest.raises(CacheError, match="make extract"):
        FeatureCache(path)


WRITER = """
import sys, numpy as np
from pipeline.sources import Batch
from pipeline.store import PartialCache
w = PartialCache.create(sys.argv[1], ids=["a", "b"], labels=[0, 1], split=["train", "test"],
                        class_names=["x", "y"], layer_dims={"l": (4, {})}, attrs={})
w.append(Batch(w.todo[:1], None, [""], [""]), {"l": np.ones((1, 4), np.float32)})
print("ready", flush=True)
sys.stdin.read()
"""


def test_reading_while_another_process_extracts(tmp_path, monkeypatch):
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "TRUE")
    path = tmp_path / "m.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HDF5_USE_FILE_LOCKING": "TRUE"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(IncompleteCacheError, match="1 of 2"):
            FeatureCache(path)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------
# read_cache_settings


def test_read_cache_settings(tmp_path):
    path = tmp_path / "m.h5"
    writer = create(path)
    assert read_partial_settings(path) == SETTINGS and read_cache_settings(path) is None
    append_rows(writer, codes(), 0, N)
    writer.finish({})
    assert read_cache_settings(path) == SETTINGS


def test_read_cache_settings_unreadable_is_none(tmp_path):
    assert read_cache_settings(tmp_path / "missing.h5") is None
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00garbage" * 50)
    assert read_cache_settings(garbage) is None
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as h5:
        h5.attrs["format"] = CACHE_FORMAT
    assert read_cache_settings(bare) is None


# ---------------------------------------------------------------------------
# Head files


def head_arrays(k=3, d=5):
    rng = np.random.default_rng(7)
    return {"coef": rng.standard_normal((k, d)).astype(np.float32),
            "intercept": rng.standard_normal(k).astype(np.float32),
            "scaler_mean": rng.standard_normal(d),
            "scaler_scale": rng.random(d) + 0.5}


def test_head_round_trip(tmp_path):
    path = tmp_path / "heads" / "h.h5"
    arrays = head_arrays()
    attrs = {"class_names": ["a", "b", "ç"], "layer": "pool", "C": 0.5, "n_train": 70,
             "grid": [{"C": 0.1, "val_accuracy": 0.8}], "dataset": "veh"}
    write_head(path, **arrays, attrs=attrs)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    got, got_attrs = read_head(path)
    for key, value in arrays.items():
        np.testing.assert_array_equal(got[key], value)
    assert got["coef"].dtype == np.float32 and got["scaler_mean"].dtype == np.float64
    assert got_attrs["class_names"] == ["a", "b", "ç"]
    assert got_attrs["grid"] == [{"C": 0.1, "val_accuracy": 0.8}]
    assert got_attrs["layer"] == "pool" and got_attrs["dataset"] == "veh"
    assert got_attrs["C"] == 0.5 and got_attrs["n_train"] == 70
    assert got_attrs["format"] == HEAD_FORMAT


def test_read_head_missing_file(tmp_path):
    with pytest.raises(CacheError, match=mentions("nope.h5", "make train-head")):
        read_head(tmp_path / "nope.h5")


def test_read_head_on_a_feature_cache(tmp_path):
    path = tmp_path / "m.h5"
    build_cache(path)
    with pytest.raises(CacheError, match=mentions(HEAD_FORMAT, "make train-head")):
        read_head(path)


def test_read_head_on_a_non_hdf5_file(tmp_path):
    path = tmp_path / "h.h5"
    path.write_text("coef=1,2,3\n")
    with pytest.raises(CacheError, match="make train-head"):
        read_head(path)


@pytest.mark.parametrize("missing", ["coef", "intercept", "scaler_mean", "scaler_scale"])
def test_read_head_with_a_missing_dataset(tmp_path, missing):
    path = tmp_path / "h.h5"
    write_head(path, **head_arrays(), attrs={})
    with h5py.File(path, "r+") as h5:
        del h5[missing]
    with pytest.raises(CacheError, match=mentions(missing, "make train-head")):
        read_head(path)


@pytest.mark.parametrize("change", [
    {"intercept": np.zeros(4)},
    {"scaler_mean": np.zeros(6)},
    {"scaler_scale": np.ones(4)},
    {"coef": np.ones(5)},
    {"coef": np.ones((0, 5)), "intercept": np.zeros(0)},
])
def test_read_head_inconsistent_shapes(tmp_path, change):
    path = tmp_path / "h.h5"
    write_head(path, **{**head_arrays(), **change}, attrs={})
    with pytest.raises(CacheError, match=mentions("inconsistent shapes", "make train-head")):
        read_head(path)


def test_read_head_scalar_intercept(tmp_path):
    path = tmp_path / "h.h5"
    write_head(path, **{**head_arrays(k=1), "intercept": 0.5}, attrs={})
    with pytest.raises(CacheError, match="make train-head"):
        read_head(path)


def test_attrs_that_look_like_code_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    path = tmp_path / "h.h5"
    write_head(path, **head_arrays(), attrs={"class_names": ["a", "b", "c"], "layer": "pool", "note": code,
                                             "meta": {"cmd": code}, "list": [code]})
    with h5py.File(path, "r+") as h5:
        h5.attrs["raw"] = "[" + code + "]"          # not JSON: must stay text
        h5.attrs["bytes"] = np.bytes_(code.encode())  # fixed-length bytes attribute
    _, attrs = read_head(path)
    assert attrs["note"] == code and isinstance(attrs["note"], str)
    assert attrs["meta"] == {"cmd": code}
    assert attrs["list"] == [code]
    assert attrs["raw"] == "[" + code + "]"
    assert attrs["bytes"] == code
    assert not marker.exists()


def test_extraction_lock_names_the_holder_and_dies_with_it(tmp_path):
    import textwrap

    from pipeline.store import extraction_lock

    path = tmp_path / "m.h5"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.store import extraction_lock
        with extraction_lock({str(path)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheError, match=rf"another `make extract` is writing this cache \(pid {holder.pid} "):
            with extraction_lock(path):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock
        holder.wait()
    with extraction_lock(path):  # free again, no stale lock
        pass


@pytest.mark.parametrize("strings", [[], [""], ["", ""], ["images/café.jpg", "日本/a b,c.png", "x"],
                                     ["line\nbreak", "tab\there"]])
def test_text_columns_pack_and_unpack_exactly(strings):
    assert list(partial._unpack(partial._pack(strings))) == strings


def test_a_nul_in_a_reason_cannot_shift_the_rows():
    assert list(partial._unpack(partial._pack(["bad\0reason", "next"]))) == ["bad\ufffdreason", "next"]


def test_a_batch_must_hold_codes_of_every_layer_for_each_row(tmp_path):
    writer = create(tmp_path / "m.h5")
    values = codes()
    rows = Batch(writer.todo[:4], None, [""] * 4, [""] * 4)
    with pytest.raises(CacheError, match=r"expected codes \{'pool': \(4, 6\), 'mid': \(4, 3\)\}"):
        writer.append(rows, {"pool": values["pool"][:4]})
    with pytest.raises(CacheError, match="3 hashes"):
        writer.append(Batch(writer.todo[:4], None, [""] * 3, [""] * 4), {k: v[:4] for k, v in values.items()})
    assert writer.n_done == 0


@pytest.mark.parametrize("damage, says", [
    ({"layer": None}, "lacks its layer or class names"), ({"class_names": None}, "lacks its layer or class names"),
    ({"class_names": ["a", "b"]}, "3 output rows for 2 class names"),
    ({"scaler_scale": np.array([1.0, 0.0, 1.0, 1.0, 1.0])}, "scaler_scale holds a value <= 0")])
def test_a_damaged_head_file_is_refused_in_one_line(tmp_path, damage, says):
    """A head without its layer or names raised a KeyError; 3 outputs for 2 names, or a scale of 0 (a division
    by zero), predicted nonsense (audit)."""
    arrays, attrs = head_arrays(), {"class_names": ["a", "b", "c"], "layer": "pool"}
    arrays.update({k: v for k, v in damage.items() if k in arrays})
    attrs.update({k: v for k, v in damage.items() if k in attrs})
    path = tmp_path / "h.h5"
    write_head(path, **arrays, attrs={k: v for k, v in attrs.items() if v is not None})
    with pytest.raises(CacheError, match=rf"^{re.escape(str(path))}: [^\n]*{says}[^\n]*make train-head`$"):
        read_head(path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


@pytest.mark.parametrize("part", ["class_names", "labels", "split", "layers"])
def test_a_complete_cache_missing_a_part_is_refused_in_one_line_and_closed(tmp_path, part):
    path = tmp_path / "m.h5"
    build_cache(path)
    with h5py.File(path, "r+") as h5:
        del (h5.attrs if part == "class_names" else h5)[part]
    with pytest.raises(CacheError, match=rf"^{re.escape(str(path))}: a damaged cache \([^\n]*\); delete it"):
        FeatureCache(path)
    with h5py.File(path, "r+"):  # not left open by the refusal
        pass


def test_the_finished_cache_is_on_disk_before_its_batches_are_removed(tmp_path, monkeypatch):
    """h5py's close leaves the file in the OS's cache: after a power cut the batches would be gone and the
    cache torn. Its data and its name in the folder are flushed first (audit)."""
    path, events = tmp_path / "m.h5", []
    writer = interrupted(path, N)
    sync, remove = os.fsync, partial.shutil.rmtree
    monkeypatch.setattr(partial.os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")) or sync(fd))
    monkeypatch.setattr(partial.shutil, "rmtree", lambda folder, **kw: events.append(f"rmtree {folder}") or
                        remove(folder, **kw))
    writer.finish({})
    assert [Path(e).name for e in events[-3:-1]] == ["m.h5.assembling", tmp_path.name]
    assert events[-1] == f"rmtree {partial_path(path)}"
    with FeatureCache(path) as cache:
        assert cache.h5.attrs["complete"]
