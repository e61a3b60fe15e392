"""datasets.py: class names, splits, fingerprints, duplicate content, and the data set errors.

Tiny data sets are built in tmp_path with the builders of test_layouts.py (which tests each
layout); decoding is tested in test_images.py, the real data sets in e2e/test_real_datasets.py.
"""
import hashlib
import os
from collections import Counter

import numpy as np
import pytest

from conftest import write_image
from pipeline.datasets import content_sha256, draw_splits, load_dataset
from pipeline.errors import DataError
from test_layouts import (SPLITS, balanced, csv_rows, expected_labels, labels_by_id, line_with, make_csv_set,
                          make_folder_set, make_pixel_set, write_csv)


# ---------------------------------------------------------------------------
# Labels


def test_numeric_labels_sort_numerically(tmp_path):
    make_folder_set(tmp_path / "nums", {"10": 10, "2": 10, "1": 10})
    table = load_dataset("nums", tmp_path)
    assert table.class_names == ["1", "2", "10"]
    for rel, label in zip(table.ids, table.labels):
        assert rel.split("/")[0] == table.class_names[label]


def test_text_labels_sort_alphabetically_csv(tmp_path):
    labels = ["zebra", "ant", "moose"] * 7
    make_csv_set(tmp_path / "zoo", labels, header=("f", "label"))
    table = load_dataset("zoo", tmp_path)
    assert table.class_names == ["ant", "moose", "zebra"]
    assert [table.class_names[i] for i in table.labels] == labels


# ---------------------------------------------------------------------------
# Splits


def test_splits_seeded(tmp_path):
    make_pixel_set(tmp_path / "px", balanced(40, [0, 1, 2]))
    a = load_dataset("px", tmp_path, seed=0)
    b = load_dataset("px", tmp_path, seed=0)
    c = load_dataset("px", tmp_path, seed=1)
    np.testing.assert_array_equal(a.split, b.split)
    assert (a.split != c.split).any()
    assert "seed 0" in a.split_source and "seed 1" in c.split_source


@pytest.mark.parametrize("counts", [{0: 70, 1: 70, 2: 60}, {0: 120, 1: 50, 2: 30}])
def test_splits_stratified_70_15_15(counts):
    labels = np.array([c for c, n in counts.items() for _ in range(n)])
    split, how = draw_splits(labels, seed=3)
    assert split.shape == labels.shape
    assert set(split) == SPLITS  # every row gets exactly one of the three
    for cls, n in counts.items():
        rows = split[labels == cls]
        share = {s: (rows == s).mean() for s in SPLITS}
        assert share["train"] == pytest.approx(0.70, abs=0.05), (cls, share)
        assert share["val"] == pytest.approx(0.15, abs=0.04), (cls, share)
        assert share["test"] == pytest.approx(0.15, abs=0.04), (cls, share)
    assert "stratified" in how


def test_splits_cover_every_row_once_on_a_data_set(tmp_path):
    make_pixel_set(tmp_path / "px", balanced(67, [0, 1, 2]))
    table = load_dataset("px", tmp_path)
    assert len(table.split) == len(table) == 201
    assert set(table.split.tolist()) == SPLITS
    n = Counter(table.split.tolist())
    assert n["train"] + n["val"] + n["test"] == 201
    assert n["test"] == pytest.approx(30, abs=2) and n["val"] == pytest.approx(30, abs=2)


def test_draw_splits_keeps_given_splits():
    labels = np.array([0, 1] * 10)
    given = ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    split, how = draw_splits(labels, seed=0, given=given)
    assert split.tolist() == given
    assert "own split" in how


# ---------------------------------------------------------------------------
# Small classes in a drawn split


def test_class_too_small_to_stratify_stays_in_train(tmp_path):
    make_folder_set(tmp_path / "f", {"big": 20, "tiny": 1})
    table = load_dataset("f", tmp_path)
    tiny = table.labels == table.class_names.index("tiny")
    assert table.split[tiny].tolist() == ["train"]
    assert set(table.split[~tiny]) == SPLITS
    assert table.split_source.endswith("; classes with fewer than 3 images kept in train: tiny")


def test_small_classes_kept_in_train_leave_the_other_draw_unchanged(tmp_path):
    make_folder_set(tmp_path / "with", {"big": 20, "mid": 14, "pair": 2, "tiny": 1})
    make_folder_set(tmp_path / "without", {"big": 20, "mid": 14})
    mixed, plain = load_dataset("with", tmp_path), load_dataset("without", tmp_path)
    assert mixed.class_names == ["big", "mid", "pair", "tiny"]
    assert mixed.ids[:34] == plain.ids
    np.testing.assert_array_equal(mixed.split[:34], plain.split)  # same seeded draw for the classes drawn
    assert mixed.split[34:].tolist() == ["train"] * 3
    assert mixed.split_source == plain.split_source + "; classes with fewer than 3 images kept in train: pair, tiny"


def test_draw_splits_names_small_classes_by_number_without_names():
    labels = np.array([0] * 20 + [1] * 20 + [2] * 2)
    split, how = draw_splits(labels, seed=0)
    assert split[40:].tolist() == ["train", "train"]
    assert how.endswith("kept in train: 2")
    split, how = draw_splits(labels, seed=0, class_names=["car", "bus", "tram"])
    assert how.endswith("kept in train: tram")


def test_small_class_in_own_train_folder_when_val_is_drawn(tmp_path):
    root = tmp_path / "fruit"
    make_folder_set(root / "Training", {"apple": 20, "pear": 20, "quince": 2})
    make_folder_set(root / "Test", {"apple": 5, "pear": 5, "quince": 1})
    table = load_dataset("fruit", tmp_path)
    quince = table.labels == table.class_names.index("quince")
    assert sorted(table.split[quince].tolist()) == ["test", "train", "train"]
    assert (table.split == "val").sum() == 6
    assert table.split_source.endswith("kept in train: quince")


# ---------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_stable_on_reread(tmp_path):
    make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    assert load_dataset("veh", tmp_path).fingerprint == load_dataset("veh", tmp_path).fingerprint


def test_fingerprint_changes_when_file_size_changes(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    before = load_dataset("veh", tmp_path).fingerprint
    write_image(root / "images" / "4.png", size=(30, 30))  # other content, other size
    assert load_dataset("veh", tmp_path).fingerprint != before


def test_fingerprint_changes_when_file_content_changes_same_size(tmp_path):
    root = make_folder_set(tmp_path / "f", {"a": 10, "b": 10})
    path = root / "a" / "3.png"
    before = load_dataset("f", tmp_path).fingerprint
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # a later edit
    assert path.stat().st_size == stat.st_size
    assert load_dataset("f", tmp_path).fingerprint != before


def test_fingerprint_changes_when_a_label_changes(tmp_path):
    labels = balanced(10, ["0", "1"])
    root = make_csv_set(tmp_path / "veh", labels)
    before = load_dataset("veh", tmp_path).fingerprint
    rows = csv_rows(root)
    rows[1][1] = "1" if rows[1][1] == "0" else "0"
    write_csv(root / "train.csv", rows)
    after = load_dataset("veh", tmp_path)
    assert after.labels[0] != int(labels[0])
    assert after.fingerprint != before


def test_fingerprint_changes_when_a_file_is_added(tmp_path):
    root = make_folder_set(tmp_path / "f", {"a": 10, "b": 10})
    before = load_dataset("f", tmp_path).fingerprint
    write_image(root / "b" / "new.png", size=(6, 6))
    after = load_dataset("f", tmp_path)
    assert len(after) == 21
    assert after.fingerprint != before


def test_fingerprint_pixel_csv_changes_with_a_value(tmp_path):
    root, _ = make_pixel_set(tmp_path / "px", balanced(10, [0, 1]))
    before = load_dataset("px", tmp_path).fingerprint
    assert load_dataset("px", tmp_path).fingerprint == before
    rows = csv_rows(root, "pixels.csv")
    rows[3][5] = "0" if rows[3][5] != "0" else "1"
    write_csv(root / "pixels.csv", rows)
    assert load_dataset("px", tmp_path).fingerprint != before


def test_fingerprint_of_clean_data_is_the_plain_digest(tmp_path):
    """No skipped rows, no duplicate rule: the digest existing caches were keyed by."""
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    digest = hashlib.sha256(b"csv:train.csv:emergency_or_not\n")
    for f, label in csv_rows(root)[1:]:
        st = (root / "images" / f).stat()
        digest.update(f"images/{f}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    assert load_dataset("veh", tmp_path).fingerprint == digest.hexdigest()


def test_fingerprint_changes_with_the_skipped_rows(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    clean = load_dataset("veh", tmp_path)
    rows = csv_rows(root)
    write_csv(root / "train.csv", rows + [["gone.png", "1"]])
    missing = load_dataset("veh", tmp_path)
    write_csv(root / "train.csv", rows + [["gone2.png", "1"]])
    other_missing = load_dataset("veh", tmp_path)
    assert missing.ids == clean.ids and missing.labels.tolist() == clean.labels.tolist()
    assert len({clean.fingerprint, missing.fingerprint, other_missing.fingerprint}) == 3


# ---------------------------------------------------------------------------
# drop_duplicates


def test_drop_duplicates_csv(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    images = root / "images"
    (images / "5.png").write_bytes((images / "2.png").read_bytes())    # same label (0)
    (images / "9.png").write_bytes((images / "2.png").read_bytes())    # same label (0)
    (images / "13.png").write_bytes((images / "3.png").read_bytes())   # label 1 against 0
    kept = load_dataset("veh", tmp_path)
    dropped = load_dataset("veh", tmp_path, drop_duplicates=True)
    assert kept.skipped == [] and not kept.drop_duplicates and len(kept) == 20
    assert dropped.drop_duplicates
    assert dropped.skipped == [("images/3.png", "same content as images/13.png with other labels"),
                               ("images/5.png", "same content as images/2.png"),
                               ("images/9.png", "same content as images/2.png"),
                               ("images/13.png", "same content as images/3.png with other labels")]
    assert labels_by_id(dropped) == expected_labels(csv_rows(root), drop={"3.png", "5.png", "9.png", "13.png"})
    assert len(set(content_sha256(dropped))) == len(dropped) == 16
    assert dropped.stamps == [kept.stamps[kept.ids.index(i)] for i in dropped.ids]
    assert dropped.fingerprint != kept.fingerprint


def test_drop_duplicates_without_duplicates_still_changes_the_fingerprint(tmp_path):
    make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    plain = load_dataset("veh", tmp_path)
    dropped = load_dataset("veh", tmp_path, drop_duplicates=True)
    assert dropped.skipped == [] and dropped.ids == plain.ids
    np.testing.assert_array_equal(dropped.split, plain.split)
    assert dropped.fingerprint != plain.fingerprint


def test_drop_duplicates_pixel_rows_keep_their_row_numbers(tmp_path):
    root, pixels = make_pixel_set(tmp_path / "px", balanced(10, [0, 1]))
    rows = csv_rows(root, "pixels.csv")
    rows[5] = list(rows[2])                  # row 4 = row 1, label 0 too
    rows[15] = [rows[2][0]] + rows[14][1:]   # row 14 = row 13 in pixels, but labelled 0 against 1
    write_csv(root / "pixels.csv", rows)
    table = load_dataset("px", tmp_path, drop_duplicates=True)
    assert table.skipped == [("4", "same content as 1"), ("13", "same content as 14 with other labels"),
                             ("14", "same content as 13 with other labels")]
    assert len(table) == 17 and "4" not in table.ids and "13" not in table.ids
    for k, row in enumerate(table.ids):
        assert table.class_names[table.labels[k]] == rows[int(row) + 1][0]
        np.testing.assert_array_equal(np.asarray(table.load_image(k))[..., 0].ravel(),
                                      [int(v) for v in rows[int(row) + 1][1:]])


def test_drop_duplicates_imagefolder_keeps_the_first_listed(tmp_path):
    root = make_folder_set(tmp_path / "f", {"a": 10})
    for i in range(10):
        write_image(root / "b" / f"{i}.png", size=(6, 6), color=(90, 10 * i, 50))
    (root / "a" / "7.png").write_bytes((root / "a" / "1.png").read_bytes())
    (root / "b" / "4.png").write_bytes((root / "a" / "2.png").read_bytes())
    table = load_dataset("f", tmp_path, drop_duplicates=True)
    assert table.skipped == [("a/2.png", "same content as b/4.png with other labels"),
                             ("a/7.png", "same content as a/1.png"),
                             ("b/4.png", "same content as a/2.png with other labels")]
    assert all(labels_by_id(table)[i] == i.split("/")[0] for i in table.ids)


def test_content_sha256_is_the_hash_load_gives(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    table = load_dataset("veh", tmp_path)
    (root / "images" / "4.png").unlink()
    hashes = content_sha256(table)
    assert hashes == content_sha256(table.root, table.ids)
    assert hashes[4] is None  # unreadable now: left to extraction to skip
    for i in (0, 9):
        assert hashes[i] == table.load(i)[1] == hashlib.sha256((root / table.ids[i]).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# Errors


def test_hidden_csv_does_not_make_a_pixel_layout(tmp_path):
    make_folder_set(tmp_path / "f", {"a": 10, "b": 10})
    (tmp_path / "f" / "._labels.csv").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    assert load_dataset("f", tmp_path).layout == "imagefolder"


def test_error_images_beside_the_csv_not_in_images(tmp_path):
    root = tmp_path / "f"
    write_image(root / "1.jpg")
    (root / "labels.csv").write_text("image_names,emergency_or_not\n1.jpg,1\n")
    with pytest.raises(DataError, match=line_with(root, "a CSV beside image files", f"{root / 'images'}/")):
        load_dataset("f", tmp_path)


def test_error_missing_data_set_folder(tmp_path):
    with pytest.raises(DataError, match=line_with(tmp_path / "nowhere", "DATA_DIR")):
        load_dataset("nowhere", tmp_path)


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=line_with(tmp_path / "empty", "no layout recognised", "README")):
        load_dataset("empty", tmp_path)


def test_error_class_folders_without_images(tmp_path):
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "b").mkdir()
    (tmp_path / "f" / "a" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=line_with(tmp_path / "f", "no layout recognised")):
        load_dataset("f", tmp_path)


def test_many_small_classes_get_one_image_of_each_a_split(tmp_path):
    """A 15 % test split of 30 images is 5 images for 10 classes: too few to stratify, so it takes 10."""
    make_folder_set(tmp_path / "f", {f"c{k}": 3 for k in range(10)})
    table = load_dataset("f", tmp_path)
    for split in ("train", "val", "test"):
        assert sorted(table.labels[table.split == split]) == list(range(10))


def test_error_every_class_too_small_to_draw():
    with pytest.raises(DataError, match="stratified test split: every class has fewer than 3 train images.*add images"):
        draw_splits(np.array([0, 0, 1, 1]), seed=0)


def test_error_only_a_test_folder(tmp_path):
    make_folder_set(tmp_path / "xray" / "test", {"normal": 5, "sick": 5})
    with pytest.raises(DataError, match="stratified val split: no train images to draw it from"):
        load_dataset("xray", tmp_path)

