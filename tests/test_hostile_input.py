"""Property-based tests: malformed CSVs, layouts and head files give a PipelineError
(one line that says what to do) or a correct result, never another exception."""
import csv
import io
import json
import os
import re
import string
import warnings

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import write_image
from pipeline.datasets import load_dataset
from pipeline.images import decode_image
from pipeline.errors import CacheError, DataError, ImageDecodeError, PipelineError
from pipeline.store import HEAD_FORMAT, read_head

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
cells = st.text(alphabet=string.printable + "éü\x00", max_size=12)
rows = st.lists(st.lists(cells, min_size=0, max_size=4), min_size=0, max_size=8)


def check_table(table):
    n = len(table)
    assert n > 0 and len(table.labels) == n and len(table.split) == n and len(table.stamps) == n
    assert set(table.split) <= {"train", "val", "test"}
    assert table.labels.min() >= 0 and table.labels.max() < len(table.class_names)
    assert len(set(table.ids)) == n  # a file is kept at most once
    assert all(isinstance(reason, str) and reason and "\n" not in reason for _, reason in table.skipped)


def csv_text(header, body):
    return "\n".join(",".join(r) for r in [header] + body) + "\n"


@SETTINGS
@given(header=st.lists(cells, min_size=0, max_size=4), body=rows, raw=st.binary(max_size=40))
def test_csv_with_images_never_crashes(tmp_path_factory, header, body, raw):
    root = tmp_path_factory.mktemp("d") / "set"
    for name in ("a.png", "b.png"):
        write_image(root / "images" / name, size=(8, 8))
    (root / "labels.csv").write_bytes(csv_text(header, body).encode("utf-8", "surrogatepass") + raw)
    try:
        check_table(load_dataset("set", root.parent))
    except PipelineError as e:
        assert "\n" not in str(e)


@SETTINGS
@given(body=st.lists(st.lists(st.one_of(st.integers(-5, 300).map(str), cells), min_size=5, max_size=5),
                     max_size=12),
       label=st.sampled_from(["y", "label", "z"]))
def test_pixel_csv_never_crashes(tmp_path_factory, body, label):
    root = tmp_path_factory.mktemp("p") / "px"
    root.mkdir()
    (root / "px.csv").write_text(csv_text([label, "p0", "p1", "p2", "p3"], body), encoding="utf-8")
    try:
        table = load_dataset("px", root.parent)
        check_table(table)
        assert table.load_image(0).size == (2, 2)
    except PipelineError as e:
        message = str(e)
        assert "\n" not in message and "usecols" not in message and "float64" not in message  # not numpy's words
        named = re.search(r"px\.csv:(\d+): ", message)
        if named:  # the line it names is under the header and is not a clean row of five integers
            with open(root / "px.csv", encoding="utf-8") as f:
                lines = f.read().split("\n")  # as numpy reads them: \r, \r\n and \n end a line
            assert 2 <= int(named[1]) <= len(lines)
            assert not re.fullmatch(r"-?\d+(,-?\d+){4}", lines[int(named[1]) - 1])


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_head_loader_refuses_garbage_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("h") / "head.h5"
    path.write_bytes(raw)
    with pytest.raises(CacheError):
        read_head(path)


shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@SETTINGS
@given(coef=shapes, intercept=shapes, mean=shapes, scale=shapes, fmt=st.sampled_from([HEAD_FORMAT, "x", None]),
       dtype=st.sampled_from(["f4", "i8", "S3"]), names=st.integers(0, 4), layer=st.sampled_from(["pool", None, 3]))
def test_head_loader_checks_every_shape(tmp_path_factory, coef, intercept, mean, scale, fmt, dtype, names, layer):
    path = tmp_path_factory.mktemp("h") / "head.h5"
    with h5py.File(path, "w") as h5:
        for key, shape in (("coef", coef), ("intercept", intercept), ("scaler_mean", mean), ("scaler_scale", scale)):
            h5.create_dataset(key, data=np.ones(shape, dtype=dtype))
        if fmt:
            h5.attrs["format"] = fmt
        h5.attrs["class_names"] = json.dumps(["a", "b", "c", "d"][:names])
        if layer is not None:
            h5.attrs["layer"] = json.dumps(layer)
    try:
        arrays, attrs = read_head(path)
    except CacheError as e:
        assert "\n" not in str(e)
        return
    k, d = arrays["coef"].shape
    assert all(np.issubdtype(a.dtype, np.number) for a in arrays.values())
    assert k >= 1 and arrays["intercept"].shape == (k,) and arrays["scaler_mean"].shape == (d,)
    assert len(attrs["class_names"]) == (2 if k == 1 else k) and attrs["layer"] == "pool"


@pytest.mark.parametrize("name", ["../outside.png", "/abs/outside.png", "link.png"])
def test_csv_paths_cannot_escape_the_data_set(tmp_path, name):
    root = tmp_path / "set"
    write_image(root / "images" / "a.png", size=(8, 8))
    outside = write_image(tmp_path / "outside.png", size=(8, 8))
    (root / "images" / "link.png").symlink_to(outside)  # a symlink pointing out of the data set
    name = str(outside) if name.startswith("/abs") else name
    (root / "labels.csv").write_text(f"file,label\na.png,x\n{name},y\n")
    with pytest.raises(DataError, match=r"labels.csv:3: .* points outside .*images; the CSV may only name"):
        load_dataset("set", tmp_path)


# ---------------------------------------------------------------------------
# CSV rows with missing files, empty labels, repeats: kept labels always match their rows

POOL = [f"{i}.png" for i in range(24)] + ["a b.png", "c,d.png", "é.png"]
names = st.sampled_from(POOL + ["./0.png", "sub/../1.png", "missing.png", "", "  ", "sub", "x\x00y.png"])
labels = st.sampled_from(["0", "1", " 1 ", "cat", "", " "])


@pytest.fixture
def pool_set(tmp_path):
    """set/images/ with the POOL images (and a folder `sub`); each example writes its own CSV."""
    root = tmp_path / "set"
    for k, name in enumerate(POOL):
        write_image(root / "images" / name, size=(4, 4), color=(k * 9, 40, 80))
    (root / "images" / "sub").mkdir()
    return root


def expected_kept(body):
    """What the rows promise: {first spelling's id: label} for files every labelled row agrees on."""
    rows = {}  # file -> (first id, labels)
    for name, label in body:
        path = os.path.normpath(name) if name.strip() and "\x00" not in name else None
        if path in POOL and label.strip():
            first, seen = rows.setdefault(path, (f"images/{name}", set()))
            seen.add(label.strip())
    return {first: seen.pop() for first, seen in rows.values() if len(seen) == 1}


CLEAN = [(f"{i}.png", "01"[i % 2]) for i in range(16)]  # enough good rows that most examples load


@SETTINGS
@given(data=st.data(), extra=st.lists(st.tuples(names, labels), max_size=40), clean=st.integers(0, len(CLEAN)))
def test_csv_rows_keep_their_labels_or_fail_cleanly(pool_set, data, extra, clean):
    body = data.draw(st.permutations(CLEAN[:clean] + extra))
    text = io.StringIO()
    csv.writer(text).writerows([("file", "label")] + body)
    (pool_set / "labels.csv").write_text(text.getvalue(), encoding="utf-8")
    expected = expected_kept(body)
    try:
        table = load_dataset("set", pool_set.parent)
    except DataError as e:
        message = str(e)
        event(message.split(": ", 1)[-1][:40])  # --hypothesis-show-statistics shows how examples ended
        assert "\n" not in message
        if expected:  # only the split can fail
            assert "cannot draw a stratified" in message
        else:
            assert "were skipped" in message or "no column names a file" in message or "needs a header" in message
        return
    event("loaded")
    check_table(table)
    assert {i: table.class_names[k] for i, k in zip(table.ids, table.labels)} == expected
    assert len(table) + len(table.skipped) == len([row for row in body if any(c.strip() for c in row)])


# ---------------------------------------------------------------------------
# Damaged image bytes decode or give ImageDecodeError, never another exception


def encoded(fmt):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    out = io.BytesIO()
    (img.convert("P") if fmt == "GIF" else img).save(out, fmt)
    return out.getvalue()


VALID = {fmt: encoded(fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")}


@SETTINGS
@given(fmt=st.sampled_from(sorted(VALID)), cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 399),
       st.integers(0, 255)), max_size=6), tail=st.binary(max_size=20))
def test_damaged_image_bytes_decode_or_skip(monkeypatch, fmt, cut, flips, tail):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # a damaged header may claim any size
    data = bytearray(VALID[fmt][:cut] if cut < len(VALID[fmt]) else VALID[fmt])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = decode_image(bytes(data) + tail)
    except ImageDecodeError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


# ---------------------------------------------------------------------------
# Image folders with odd file names: labelled by their folder, or skipped when not UTF-8

file_names = st.one_of(st.text(alphabet=string.ascii_letters + " ,.'-éü日", min_size=1, max_size=10),
                       st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\x00" not in b))


@SETTINGS
@given(files=st.lists(st.tuples(st.sampled_from(["a", "b"]), file_names), max_size=12))
def test_imagefolder_odd_names_keep_their_class(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("f") / "set"
    for cls in ("a", "b"):
        for i in range(8):
            write_image(root / cls / f"{i}.png", size=(4, 4))
    written = set()
    for cls, name in files:
        raw = name if isinstance(name, bytes) else name.encode()
        if raw in (b".", b"..") or raw.startswith(b"."):
            continue
        path = os.fsencode(root / cls) + b"/" + raw + b".png"
        if os.path.exists(path):  # one of the 16 fillers, or written already
            continue
        with open(path, "wb") as f:
            f.write(b"\x89PNG not really")
        written.add((cls, raw))
    table = load_dataset("set", root.parent)
    check_table(table)
    assert all(table.class_names[k] == i.split("/")[0] for i, k in zip(table.ids, table.labels))
    bad = {(cls, raw) for cls, raw in written if not _is_utf8(raw + b".png")}
    assert len(table) == 16 + len(written) - len(bad)
    assert sorted(table.skipped) == sorted(
        (f"{cls}/{(raw + b'.png').decode('utf-8', 'backslashreplace')}", "file name is not valid UTF-8; rename it")
        for cls, raw in bad)


def _is_utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
