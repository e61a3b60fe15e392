"""Property-based tests: malformed CSVs, layouts and head files give a PipelineError
(one line that says what to do) or a correct result, never another exception."""
import string

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_image
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError, PipelineError
from pipeline.store import HEAD_FORMAT, read_head

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
cells = st.text(alphabet=string.printable + "éü\x00", max_size=12)
rows = st.lists(st.lists(cells, min_size=0, max_size=4), min_size=0, max_size=8)


def check_table(table):
    n = len(table)
    assert n > 0 and len(table.labels) == n and len(table.split) == n
    assert set(table.split) <= {"train", "val", "test"}
    assert table.labels.min() >= 0 and table.labels.max() < len(table.class_names)


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
        assert "\n" not in str(e)


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
       dtype=st.sampled_from(["f4", "i8", "S3"]))
def test_head_loader_checks_every_shape(tmp_path_factory, coef, intercept, mean, scale, fmt, dtype):
    path = tmp_path_factory.mktemp("h") / "head.h5"
    with h5py.File(path, "w") as h5:
        for key, shape in (("coef", coef), ("intercept", intercept), ("scaler_mean", mean), ("scaler_scale", scale)):
            h5.create_dataset(key, data=np.zeros(shape, dtype=dtype))
        if fmt:
            h5.attrs["format"] = fmt
    try:
        arrays, _ = read_head(path)
    except CacheError:
        return
    k, d = arrays["coef"].shape
    assert all(np.issubdtype(a.dtype, np.number) for a in arrays.values())
    assert k >= 1 and arrays["intercept"].shape == (k,) and arrays["scaler_mean"].shape == (d,)


@pytest.mark.parametrize("name", ["../outside.png", "/abs/outside.png", "link.png"])
def test_csv_paths_cannot_escape_the_data_set(tmp_path, name):
    root = tmp_path / "set"
    write_image(root / "images" / "a.png", size=(8, 8))
    outside = write_image(tmp_path / "outside.png", size=(8, 8))
    (root / "images" / "link.png").symlink_to(outside)  # a symlink pointing out of the data set
    name = str(outside) if name.startswith("/abs") else name
    (root / "labels.csv").write_text(f"file,label\na.png,x\n{name},y\n")
    with pytest.raises(PipelineError, match=r"do not exist inside .*images"):
        load_dataset("set", tmp_path)
