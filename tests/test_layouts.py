"""layouts.py: each layout read into rows (csv, imagefolder, pixel CSV, digits), rows left out with
their reason, CSVs that cannot be read, and the per-row stamps. Through load_dataset, as the
pipeline reads them.

The builders here make tiny data sets in tmp_path; test_datasets.py and the e2e tests use them too.
"""
import csv
import hashlib
import os
import re
from collections import Counter

import numpy as np
import pytest

from conftest import write_image
from pipeline.datasets import load_dataset
from pipeline.errors import DataError
from pipeline.layouts import LABEL_COLUMNS

SPLITS = {"train", "val", "test"}


def line_with(*parts):
    """A regex for pytest.raises(match=...): a one-line message holding `parts`, in this order."""
    return r"\A[^\n]*" + r"[^\n]*".join(re.escape(str(p)) for p in parts) + r"[^\n]*\Z"


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def make_csv_set(root, labels, header=("image_names", "emergency_or_not"), extra=None):
    """images/<i>.png + a CSV `file,label` (+ an extra column when `extra` is a header name)."""
    rows = [list(header) + ([extra] if extra else [])]
    for i, label in enumerate(labels):
        name = f"{i}.png"
        write_image(root / "images" / name, size=(8, 6), color=(10 * (i % 20), 100, 200))
        rows.append([name, label] + ([f"note{i}"] if extra else []))
    write_csv(root / "train.csv", rows)
    return root


def make_folder_set(root, per_class):
    """<root>/<class>/<i>.png for a {class: count} mapping."""
    for cls, count in per_class.items():
        for i in range(count):
            write_image(root / cls / f"{i}.png", size=(6, 6), color=(50, 10 * (i % 20), 90))
    return root


def make_pixel_set(root, labels, side=4, label_name="y", label_pos=0, scale=255, seed=0):
    """A pixel CSV with one label column at `label_pos` and side*side pixel columns."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(len(labels), side * side))
    names = [f"pixel{j}" for j in range(side * side)]
    header = names[:label_pos] + [label_name] + names[label_pos:]
    rows = [header]
    for label, values in zip(labels, pixels):
        cells = [str(v) if scale == 255 else repr(float(v) / 255.0) for v in values]
        rows.append(cells[:label_pos] + [str(label)] + cells[label_pos:])
    write_csv(root / "pixels.csv", rows)
    return root, pixels


def balanced(n_per_class, classes):
    return [c for c in classes for _ in range(n_per_class)]


def csv_rows(root, name="train.csv"):
    with open(root / name, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def labels_by_id(table):
    return {i: table.class_names[k] for i, k in zip(table.ids, table.labels)}


def expected_labels(rows, drop=()):
    """{id: label} from CSV rows [file, label], leaving out the files in `drop`."""
    return {f"images/{f}": label for f, label in rows[1:] if f not in drop}


# ---------------------------------------------------------------------------
# Layouts


def test_csv_layout_read(tmp_path):
    labels = balanced(10, ["0", "1"])
    make_csv_set(tmp_path / "veh", labels)
    table = load_dataset("veh", tmp_path)
    assert table.layout == "csv"
    assert len(table) == 20
    assert table.ids == [f"images/{i}.png" for i in range(20)]
    assert table.class_names == ["0", "1"]
    assert table.labels.dtype == np.int64
    assert table.labels.tolist() == [int(v) for v in labels]
    assert table.pixels is None
    img = table.load_image(3)
    assert img.mode == "RGB" and img.size == (8, 6)


def test_csv_layout_label_column_named_label_with_extra_column(tmp_path):
    labels = balanced(10, ["cat", "dog"])
    make_csv_set(tmp_path / "pets", labels, header=("file", "label"), extra="source")
    table = load_dataset("pets", tmp_path)
    assert table.layout == "csv"
    assert table.class_names == ["cat", "dog"]
    assert [table.class_names[i] for i in table.labels] == labels


def test_csv_layout_label_column_named_label_before_file_column(tmp_path):
    root = tmp_path / "pets"
    rows = [["notes", "label", "path"]]
    for i, label in enumerate(balanced(10, ["b", "a"])):
        write_image(root / "images" / f"p{i}.png", size=(5, 5))
        rows.append([f"n{i}", label, f"p{i}.png"])
    write_csv(root / "meta.csv", rows)
    table = load_dataset("pets", tmp_path)
    assert table.ids[0] == "images/p0.png"
    assert table.class_names == ["a", "b"]
    assert table.labels.tolist() == [1] * 10 + [0] * 10


def test_imagefolder_flat(tmp_path):
    make_folder_set(tmp_path / "flowers", {"tulip": 10, "daisy": 12, "rose": 8})
    table = load_dataset("flowers", tmp_path)
    assert table.layout == "imagefolder"
    assert table.class_names == ["daisy", "rose", "tulip"]
    assert len(table) == 30
    assert Counter(table.class_names[i] for i in table.labels) == {"tulip": 10, "daisy": 12, "rose": 8}
    for rel, label in zip(table.ids, table.labels):
        assert rel.split("/")[0] == table.class_names[label]
    assert "stratified" in table.split_source
    assert set(table.split) == SPLITS


def test_imagefolder_own_split_folders_kept(tmp_path):
    root = tmp_path / "xray"
    make_folder_set(root / "train", {"normal": 6, "sick": 6})
    make_folder_set(root / "val", {"normal": 2, "sick": 2})
    make_folder_set(root / "test", {"normal": 3, "sick": 3})
    table = load_dataset("xray", tmp_path)
    assert table.layout == "imagefolder"
    assert table.class_names == ["normal", "sick"]
    assert Counter(table.split.tolist()) == {"train": 12, "val": 4, "test": 6}
    for rel, split in zip(table.ids, table.split):
        assert rel.split("/")[0] == split  # each row keeps the split of its folder
    assert "own split folders" in table.split_source
    assert "stratified" not in table.split_source


def test_a_class_folder_named_like_a_split_is_a_class(tmp_path):
    """Trains among vehicles: `train/` holding images, not class folders, is a class (audit: it was taken for
    a split folder, and the data set had no images)."""
    make_folder_set(tmp_path / "vehicles", {"bus": 6, "train": 6, "truck": 6})
    table = load_dataset("vehicles", tmp_path)
    assert table.class_names == ["bus", "train", "truck"] and len(table) == 18 and "stratified" in table.split_source


def test_class_folders_beside_split_folders_are_refused_not_dropped(tmp_path):
    root = tmp_path / "xray"
    make_folder_set(root / "train", {"normal": 6, "sick": 6})
    make_folder_set(root / "test", {"normal": 3, "sick": 3})
    make_folder_set(root, {"extra": 4})  # before, left out without a word
    (root / "empty").mkdir()             # nothing in it: no harm
    with pytest.raises(DataError, match=r"^\S*xray: class folders \(extra\) beside split folders that hold class "
                                        r"folders \(test and train\); move each class folder under a split folder"):
        load_dataset("xray", tmp_path)


def test_imagefolder_training_test_folders_carve_val_from_train_only(tmp_path):
    root = tmp_path / "fruit"
    make_folder_set(root / "Training", {"apple": 20, "pear": 20})
    make_folder_set(root / "Test", {"apple": 5, "pear": 5})
    table = load_dataset("fruit", tmp_path)
    folder = np.array([rel.split("/")[0] for rel in table.ids])
    assert set(folder) == {"Training", "Test"}
    # test rows are exactly the Test/ folder, untouched
    assert (table.split[folder == "Test"] == "test").all()
    assert (table.split == "test").sum() == 10
    # val comes only from Training/: 15 % of it, stratified (3 of each class)
    assert set(table.split[folder == "Training"]) == {"train", "val"}
    val = table.split == "val"
    assert val.sum() == 6
    assert Counter(table.labels[val].tolist()) == {0: 3, 1: 3}
    assert "draw of val from train" in table.split_source


def test_pixel_csv_label_y_first(tmp_path):
    labels = balanced(10, [3, 7])
    _, pixels = make_pixel_set(tmp_path / "px", labels)
    table = load_dataset("px", tmp_path)
    assert table.layout == "pixels"
    assert table.ids == [str(i) for i in range(20)]
    assert table.class_names == ["3", "7"]
    assert table.labels.tolist() == [0] * 10 + [1] * 10
    assert table.pixels.shape == (20, 4, 4) and table.pixels.dtype == np.uint8
    np.testing.assert_array_equal(table.pixels.reshape(20, 16), pixels)
    img = table.load_image(5)
    assert img.mode == "RGB" and img.size == (4, 4)
    rgb = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], pixels[5].reshape(4, 4))


def test_pixel_csv_label_column_not_first(tmp_path):
    labels = balanced(10, ["1", "0"])
    _, pixels = make_pixel_set(tmp_path / "px", labels, label_name="label", label_pos=7)
    table = load_dataset("px", tmp_path)
    assert table.class_names == ["0", "1"]
    assert table.labels.tolist() == [1] * 10 + [0] * 10
    np.testing.assert_array_equal(table.pixels.reshape(20, 16), pixels)


def test_pixel_csv_values_0_to_1_are_scaled(tmp_path):
    labels = balanced(10, [0, 1])
    _, pixels = make_pixel_set(tmp_path / "px", labels, scale=1)
    table = load_dataset("px", tmp_path)
    assert table.pixels.max() > 1  # scaled, not left at 0..1
    np.testing.assert_allclose(table.pixels.reshape(20, 16).astype(int), pixels, atol=1)


def test_pixel_csv_exact_scaling_of_unit_values(tmp_path):
    root = tmp_path / "px"
    rows = [["y"] + [f"p{j}" for j in range(4)]]
    rows += [[str(i % 2), "0", "1", "0.2", "0.5"] for i in range(20)]
    write_csv(root / "unit.csv", rows)
    table = load_dataset("px", tmp_path)
    assert table.pixels.shape == (20, 2, 2)
    assert table.pixels[0].ravel().tolist() == [0, 255, 51, 128]


def test_digits_builtin(tmp_path):
    table = load_dataset("digits", tmp_path)  # no tmp_path/digits folder: sklearn's bundled set
    assert table.layout == "digits"
    assert len(table) == 1797
    assert table.class_names == [str(c) for c in range(10)]
    assert sorted(set(table.labels.tolist())) == list(range(10))
    assert table.pixels.shape == (1797, 8, 8) and table.pixels.dtype == np.uint8
    assert table.pixels.max() == 255 and table.pixels.min() == 0  # 0..16 scaled to 0..255
    img = table.load_image(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert set(table.split) == SPLITS


def test_ids_are_relative_posix_paths(tmp_path):
    root = tmp_path / "nest"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(10):
                write_image(root / split / cls / "sub" / f"{i}.png", size=(4, 4))
    table = load_dataset("nest", tmp_path)
    assert len(table) == 40
    for rel in table.ids:
        assert "\\" not in rel and not rel.startswith("/")
        assert (root / rel).is_file()
    assert "train/a/sub/0.png" in table.ids


# ---------------------------------------------------------------------------
# CSVs that cannot be read


def test_error_csv_naming_no_existing_file(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    for path in (root / "images").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=line_with("train.csv", "no column names a file", "relative to images/")):
        load_dataset("veh", tmp_path)


def test_error_csv_without_a_file_column(tmp_path):
    root = tmp_path / "veh"
    write_image(root / "images" / "a.png")
    write_csv(root / "labels.csv", [["id", "label"], ["17", "0"], ["18", "1"]])
    with pytest.raises(DataError, match=line_with("labels.csv", "no column names a file", "relative to images/")):
        load_dataset("veh", tmp_path)


def test_error_csv_label_column_ambiguous(tmp_path):
    root = tmp_path / "veh"
    write_image(root / "images" / "a.png")
    write_csv(root / "t.csv", [["file", "colour", "size"], ["a.png", "red", "big"]])
    names_that_work = f"name it one of {', '.join(LABEL_COLUMNS)}"
    with pytest.raises(DataError, match=line_with("t.csv", "'colour', 'size'", names_that_work)):
        load_dataset("veh", tmp_path)


def test_error_csv_folder_with_two_csvs(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    flipped = [[name, "1" if label == "0" else "0"] for name, label in csv_rows(root)[1:]]
    write_csv(root / "other.csv", [["file", "label"]] + flipped)  # a second CSV must not decide the labels
    write_csv(root / "a_test_list.csv", [["file"], ["0.png"]])
    with pytest.raises(DataError, match=line_with("veh: 3 CSV files (a_test_list.csv, other.csv and train.csv)",
                                                  "cannot tell which holds the labels",
                                                  "keep one CSV in", "move the others out")):
        load_dataset("veh", tmp_path)


def test_csv_hidden_csv_is_not_a_second_csv(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    (root / "._train.csv").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "notes.csv").mkdir()  # a folder, not a CSV file
    assert len(load_dataset("veh", tmp_path)) == 20


def test_error_csv_row_with_more_fields_than_the_header(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    rows = csv_rows(root)
    rows[5].append("extra")  # file line 6
    write_csv(root / "train.csv", rows)
    with pytest.raises(DataError, match=line_with("train.csv:6: row has 3 fields, expected 2; fix that line")):
        load_dataset("veh", tmp_path)


def test_error_csv_row_with_more_fields_than_a_wide_header(tmp_path):
    root = make_csv_set(tmp_path / "pets", balanced(10, ["cat", "dog"]), header=("file", "label"), extra="source")
    rows = csv_rows(root)
    rows[3].append("4th")
    write_csv(root / "train.csv", rows)
    with pytest.raises(DataError, match=line_with("train.csv:4: row has 4 fields, expected 3; fix that line")):
        load_dataset("pets", tmp_path)


def test_csv_row_with_trailing_empty_fields_is_read(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    rows = csv_rows(root)
    write_csv(root / "train.csv", rows[:5] + [rows[5] + ["", " "]] + rows[6:])  # `4.png,0,, `: nothing is dropped
    table = load_dataset("veh", tmp_path)
    assert labels_by_id(table) == expected_labels(rows)


def test_error_csv_header_and_blank_line_only(tmp_path):
    root = tmp_path / "veh"
    (root / "images").mkdir(parents=True)
    (root / "t.csv").write_text("image_names,emergency_or_not\n\n")
    with pytest.raises(DataError, match=line_with("t.csv: needs a header and rows")):
        load_dataset("veh", tmp_path)


def write_pixel_csv(root, header, n_pixels, rows=4, bad=None):
    """root/p.csv: `header` then `n_pixels` pixel columns, `rows` rows of label 0 and pixels 1;
    `bad` = (row, column, text) puts `text` in one cell."""
    table = [[header] + [f"p{j}" for j in range(n_pixels)]] + [["0"] + ["1"] * n_pixels for _ in range(rows)]
    if bad:
        row, column, text = bad
        table[row][column] = text
    return write_csv(root / "p.csv", table)


def test_error_pixel_csv_not_square(tmp_path):
    write_pixel_csv(tmp_path / "px", "y", 15)
    with pytest.raises(DataError, match=line_with("p.csv", "15 pixel columns", "square")):
        load_dataset("px", tmp_path)


def test_error_pixel_csv_without_label_column(tmp_path):
    write_pixel_csv(tmp_path / "px", "klass", 16)
    with pytest.raises(DataError, match=line_with("p.csv", "`y` or `label`")):
        load_dataset("px", tmp_path)


def test_error_pixel_csv_non_numeric_value(tmp_path):
    write_pixel_csv(tmp_path / "px", "y", 16, bad=(3, 9, "dark"))  # data row 3 is file line 4
    with pytest.raises(DataError, match=line_with("p.csv:4: value 'dark' in column p8 is not a number; fix that line")):
        load_dataset("px", tmp_path)


def test_error_pixel_csv_text_label_says_labels_are_class_numbers(tmp_path):
    write_pixel_csv(tmp_path / "px", "label", 16, bad=(2, 0, "boot"))  # the label column, data row 2: file line 3
    with pytest.raises(DataError, match=line_with("p.csv:3: label 'boot' is not a class number; a pixel CSV's labels "
                                                  "are numbers (0, 1, ...): number the classes")):
        load_dataset("px", tmp_path)


def test_error_pixel_csv_short_row_names_its_file_line(tmp_path):
    path = write_pixel_csv(tmp_path / "px", "y", 16, rows=80)
    with open(path, "a") as f:
        f.write("3,1,2,3\n")  # file line 82
    with pytest.raises(DataError, match=line_with("p.csv:82: row has 4 values, the header has 17; fix that line")) as e:
        load_dataset("px", tmp_path)
    assert "usecols" not in str(e.value)  # numpy's advice, no use to the user


def test_error_pixel_csv_long_row_names_its_file_line(tmp_path):
    path = write_pixel_csv(tmp_path / "px", "y", 4)
    path.write_text(path.read_text() + "1,2,3,4,5,6\n")
    with pytest.raises(DataError, match=line_with("p.csv:6: row has 6 values, the header has 5; fix that line")):
        load_dataset("px", tmp_path)


def test_error_pixel_csv_every_row_one_value_short(tmp_path):
    write_csv(tmp_path / "px" / "p.csv", [["y"] + [f"p{j}" for j in range(4)]] + [["0", "1", "2", "3"]] * 4)
    with pytest.raises(DataError, match=line_with("p.csv:2: row has 4 values, the header has 5; fix that line")):
        load_dataset("px", tmp_path)


def test_error_pixel_csv_line_numbers_count_blank_and_comment_lines(tmp_path):
    root = tmp_path / "px"
    root.mkdir()
    (root / "p.csv").write_text("\ny,a,b,c,d\n0,1,2,3,4\n\n# a note\n1,2,3,4,5 # fine\n1,2,3,abc,5\n")
    with pytest.raises(DataError, match=line_with("p.csv:7: value 'abc' in column c is not a number; fix that line")):
        load_dataset("px", tmp_path)


def test_pixel_csv_blank_line_before_the_header(tmp_path):
    root = tmp_path / "px"
    root.mkdir()
    (root / "p.csv").write_text("\ny,a,b,c,d\n" + "".join(f"{i % 2},1,2,3,{i}\n" for i in range(20)))
    assert load_dataset("px", tmp_path).pixels.shape == (20, 2, 2)


@pytest.mark.parametrize("cell", ["", "1_0", "\"7\"", "0x10"])
def test_error_pixel_csv_value_numpy_does_not_read(tmp_path, cell):
    path = write_pixel_csv(tmp_path / "px", "y", 4)
    lines = path.read_text().splitlines()
    lines[2] = f"0,1,1,{cell},1"  # written as is: numpy reads quotes as text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=line_with(f"p.csv:3: value {cell!r} in column p2 is not a number")):
        load_dataset("px", tmp_path)


@pytest.mark.parametrize("cell", ["inf", "nan", "-Infinity"])
def test_error_pixel_csv_value_not_finite(tmp_path, cell):
    write_pixel_csv(tmp_path / "px", "y", 4, bad=(4, 1, cell))
    with pytest.raises(DataError, match=line_with(f"p.csv:5: value {cell!r} in column p0 is not a finite number; "
                                                  "fix that line")):
        load_dataset("px", tmp_path)


def test_error_pixel_folder_with_two_csvs(tmp_path):
    make_pixel_set(tmp_path / "px", balanced(10, [0, 1]))
    make_pixel_set(tmp_path / "px", balanced(10, [1, 0]))
    (tmp_path / "px" / "pixels.csv").rename(tmp_path / "px" / "a_backup.csv")
    make_pixel_set(tmp_path / "px", balanced(10, [0, 1]))
    with pytest.raises(DataError, match=line_with("px: 2 CSV files (a_backup.csv and pixels.csv)",
                                                  "keep one CSV in", "move the others out")):
        load_dataset("px", tmp_path)


# ---------------------------------------------------------------------------
# Hostile listings: rows are skipped with a reason, labels never shift


def test_csv_missing_file_is_skipped(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    (root / "images" / "7.png").unlink()
    (root / "images" / "0.png").unlink()  # the first row too: the file column is still found
    table = load_dataset("veh", tmp_path)
    assert table.skipped == [("images/0.png", "no such file (train.csv line 2)"),
                             ("images/7.png", "no such file (train.csv line 9)")]
    assert len(table) == 18
    assert labels_by_id(table) == expected_labels(csv_rows(root), drop={"0.png", "7.png"})


def test_csv_without_a_header_line_is_refused_not_short_of_its_first_image(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    write_csv(root / "train.csv", csv_rows(root)[1:])  # the rows without the header
    with pytest.raises(DataError, match=line_with("train.csv", "first line names an image (0.png)", "header line")):
        load_dataset("veh", tmp_path)


def test_csv_directory_named_as_a_file_is_skipped(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    (root / "images" / "sub").mkdir()
    rows = csv_rows(root) + [["sub", "1"]]
    write_csv(root / "train.csv", rows)
    table = load_dataset("veh", tmp_path)
    assert table.skipped == [("images/sub", "not a file (train.csv line 22)")]
    assert labels_by_id(table) == expected_labels(rows, drop={"sub"})


@pytest.mark.parametrize("name", ["../outside.png", "../nothing.png", "sub/../../outside.png"])
def test_csv_path_escaping_is_an_error_even_when_missing(tmp_path, name):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    write_image(root / "outside.png")
    write_csv(root / "train.csv", csv_rows(root) + [[name, "1"]])
    with pytest.raises(DataError, match=line_with(f"train.csv:22: {name!r} points outside",
                                                  "only name files inside images/")):
        load_dataset("veh", tmp_path)


def test_csv_same_file_listed_twice_with_same_label_keeps_the_first(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    rows = csv_rows(root) + [["3.png", "0"], ["./3.png", "0"]]
    write_csv(root / "train.csv", rows)
    table = load_dataset("veh", tmp_path)
    assert table.skipped == [("images/3.png", "duplicate of images/3.png (line 5)"),
                             ("images/./3.png", "duplicate of images/3.png (line 5)")]
    assert table.ids.count("images/3.png") == 1 and len(table) == 20
    assert labels_by_id(table) == expected_labels(csv_rows(root)[:21])


def test_csv_same_file_with_conflicting_labels_skips_every_row(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    rows = csv_rows(root) + [["3.png", "1"], ["12.png", "0"], ["12.png", "1"]]
    write_csv(root / "train.csv", rows)
    table = load_dataset("veh", tmp_path)
    assert table.skipped == [("images/3.png", "listed twice with labels 0 and 1 (lines 5 and 22)"),
                             ("images/12.png", "listed 3 times with labels 1 and 0 (lines 14, 23 and 24)"),
                             ("images/3.png", "listed twice with labels 0 and 1 (lines 5 and 22)"),
                             ("images/12.png", "listed 3 times with labels 1 and 0 (lines 14, 23 and 24)"),
                             ("images/12.png", "listed 3 times with labels 1 and 0 (lines 14, 23 and 24)")]
    assert len(table) == 18
    assert labels_by_id(table) == expected_labels(rows[:21], drop={"3.png", "12.png"})


def test_csv_empty_label_is_skipped_with_its_line(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    rows = csv_rows(root)
    rows[6][1], rows[15][1] = "", "  "
    write_csv(root / "train.csv", rows)
    table = load_dataset("veh", tmp_path)
    assert table.skipped == [("images/5.png", "empty label (train.csv line 7)"),
                             ("images/14.png", "empty label (train.csv line 16)")]
    assert labels_by_id(table) == expected_labels(rows, drop={"5.png", "14.png"})


def test_csv_line_numbers_count_blank_lines_and_multiline_fields(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]), header=("file", "label"), extra="note")
    lines = (root / "train.csv").read_text().splitlines()
    lines[2] = lines[2].replace("note1", '"two\nlines"')  # 1.png's row spans two lines
    lines.insert(1, "")                                   # a blank line 2
    text = "\n".join(lines) + "\n"                         # 0.png on line 3, 1.png on 4-5, 2.png on 6 ...
    text = text.replace("5.png,0,", "5.png,,")             # ... and 5.png on line 9
    (root / "train.csv").write_text(text)
    table = load_dataset("veh", tmp_path)
    assert table.skipped == [("images/5.png", "empty label (train.csv line 9)")]
    assert len(table) == 19


def test_csv_every_row_skipped_is_an_error(tmp_path):
    root = make_csv_set(tmp_path / "veh", ["0", "1", "0"])
    write_csv(root / "train.csv", [["file", "label"], ["0.png", ""], ["1.png", "1"], ["1.png", "0"], ["9.png", "1"]])
    with pytest.raises(DataError, match=line_with("train.csv: all 4 listed images were skipped",
                                                  "images/0.png: empty label (train.csv line 2)",
                                                  "images/1.png: listed twice with labels 1 and 0 (lines 3 and 4)",
                                                  "fix those rows or files")):
        load_dataset("veh", tmp_path)


def test_csv_names_with_spaces_commas_and_unicode(tmp_path):
    root = tmp_path / "odd"
    names = ["a b.png", "c,d.png", "é.png", "日本 語.png", "q'uote\".png", "  lead.png"]
    rows = [["file", "label"]]
    for k, name in enumerate(names * 4):
        name = f"{k}-{name}"
        write_image(root / "images" / name, size=(5, 5), color=(k * 9, 40, 40))
        rows.append([name, "xy"[k % 2]])
    write_csv(root / "t.csv", rows)
    table = load_dataset("odd", tmp_path)
    assert table.skipped == []
    assert labels_by_id(table) == expected_labels(rows)
    assert table.load_image(table.ids.index("images/3-日本 語.png")).size == (5, 5)


def test_imagefolder_names_with_spaces_commas_and_unicode(tmp_path):
    make_folder_set(tmp_path / "f", {"a b": 10, "ç,d": 10})
    write_image(tmp_path / "f" / "a b" / "x, y é.png", size=(6, 6))
    table = load_dataset("f", tmp_path)
    assert table.skipped == [] and len(table) == 21
    assert labels_by_id(table)["a b/x, y é.png"] == "a b"
    assert all(labels_by_id(table)[i] == i.split("/")[0] for i in table.ids)


def test_imagefolder_name_not_utf8_is_skipped(tmp_path):
    root = make_folder_set(tmp_path / "f", {"a": 10, "b": 10})
    bad = os.fsencode(root / "a") + b"/bad\xff name.png"
    with open(bad, "wb") as f:
        f.write((root / "a" / "0.png").read_bytes())
    os.mkdir(os.fsencode(root) + b"/cl\xe9ss")
    with open(os.fsencode(root) + b"/cl\xe9ss/1.png", "wb") as f:
        f.write((root / "a" / "1.png").read_bytes())
    table = load_dataset("f", tmp_path)
    assert table.skipped == [("a/bad\\xff name.png", "file name is not valid UTF-8; rename it"),
                             ("cl\\xe9ss/1.png", "file name is not valid UTF-8; rename it")]
    assert table.class_names == ["a", "b"] and len(table) == 20
    assert all(labels_by_id(table)[i] == i.split("/")[0] for i in table.ids)


def test_imagefolder_every_image_skipped_is_an_error(tmp_path):
    root = tmp_path / "f"
    os.makedirs(os.fsencode(root) + b"/a")
    with open(os.fsencode(root) + b"/a/\xff.png", "wb") as f:
        f.write(b"whatever")
    with pytest.raises(DataError, match=r"all 1 listed images were skipped \(first: a/\\xff.png: file name"):
        load_dataset("f", tmp_path)


# ---------------------------------------------------------------------------
# Stamps


def test_stamps_are_size_and_mtime_per_row(tmp_path):
    root = make_csv_set(tmp_path / "veh", balanced(10, ["0", "1"]))
    table = load_dataset("veh", tmp_path)
    assert len(table.stamps) == len(table)
    for rel, stamp in zip(table.ids, table.stamps):
        st = (root / rel).stat()
        assert stamp == f"{st.st_size}:{st.st_mtime_ns}"


def test_stamps_of_pixel_rows_are_their_sha256(tmp_path):
    make_pixel_set(tmp_path / "px", balanced(10, [0, 1]))
    table = load_dataset("px", tmp_path)
    for i, stamp in enumerate(table.stamps):
        assert stamp == hashlib.sha256(table.pixels[i].tobytes()).hexdigest() == table.load(i)[1]

