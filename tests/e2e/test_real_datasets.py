"""The three real data sets in ../shared read as the pipeline reads them: layout, size, classes,
splits, one decoded image each, and the vehicles set's byte-identical copies under drop_duplicates."""
from collections import Counter

import pytest

from pipeline.datasets import content_sha256, load_dataset
from test_layouts import SPLITS, csv_rows, expected_labels, labels_by_id

pytestmark = pytest.mark.e2e


def test_real_vehicles(shared):
    table = load_dataset("vehicles", shared / "data")
    assert table.layout == "csv"
    assert len(table) == 1646
    assert table.class_names == ["0", "1"]
    assert int((table.labels == 1).sum()) == 681
    assert all(i.startswith("images/") and i.endswith(".jpg") for i in table.ids)
    assert set(table.split) == SPLITS
    img = table.load_image(0)
    assert img.mode == "RGB" and img.size == (224, 224)


def test_real_pneumoniamnist(shared):
    table = load_dataset("pneumoniamnist", shared / "data")
    assert table.layout == "imagefolder"
    assert table.class_names == ["0_normal", "1_pneumonia"]
    assert Counter(table.split.tolist()) == {"train": 2428, "val": 270, "test": 468}
    assert "own split folders" in table.split_source
    img = table.load_image(0)
    assert img.mode == "RGB" and img.size == (28, 28)


def test_real_fashion_mnist_subset(shared):
    table = load_dataset("fashion-mnist-subset", shared / "data")
    assert table.layout == "pixels"
    assert len(table) == 2557
    assert table.pixels.shape == (2557, 28, 28)
    assert table.class_names == [str(c) for c in range(10)]
    img = table.load_image(0)
    assert img.mode == "RGB" and img.size == (28, 28)


def test_real_vehicles_drop_duplicates(shared):
    """The vehicles set holds 68 groups of byte-identical images (148 rows); two groups mix labels."""
    plain = load_dataset("vehicles", shared / "data")
    table = load_dataset("vehicles", shared / "data", drop_duplicates=True)
    reasons = Counter("other labels" if r.endswith("with other labels") else r.split(" as ")[0]
                      for _, r in table.skipped)
    assert reasons == {"same content": 74, "other labels": 8}
    conflicting = {i for i, r in table.skipped if r.endswith("with other labels")}
    assert conflicting == {f"images/{n}.jpg" for n in (523, 709, 872, 1302, 1356, 1906, 54, 2029)}
    assert len(table) == 1646 - 82 and not set(table.ids) & {i for i, _ in table.skipped}
    assert Counter(table.class_names[k] for k in table.labels) == {"0": 902, "1": 662}
    rows = csv_rows(shared / "data" / "vehicles", "emergency_train.csv")
    assert labels_by_id(table) == {i: label for i, label in expected_labels(rows).items() if i in table.ids}
    assert len(set(content_sha256(table))) == len(table)
    assert table.fingerprint != plain.fingerprint and plain.skipped == []

