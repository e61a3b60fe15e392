"""The layouts a data set can come in, each read into a Listing: its usable rows
(ids, label text, stamps, the data set's own split), and the rows left out with why.

    csv          images/ + a CSV naming each file and its label (the vehicles layout)
    imagefolder  class folders, directly or under split folders (train/ val/ test/, ...)
    pixels       one CSV of pixel rows, and digits, scikit-learn's bundled 8x8 digits (pixel_csv.py)

A row that cannot be used (a missing file, an empty label, a file listed twice, a
name that is not UTF-8) is left out with its reason, never guessed at. A path
leading out of the data set, an unreadable CSV, a row with more values than its header
(or too few), and a folder with two CSVs (which one holds the labels?) are DataErrors
naming the file, the line and the remedy.
"""
import csv
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError
from .images import cannot_read
from .sources import is_image_file

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
LABEL_COLUMNS = ("label", "labels", "y", "class", "target", "category")
FILE_COLUMN_SAMPLE = 100  # CSV rows looked at to tell which column names the files
NOT_UTF8 = "file name is not valid UTF-8; rename it"


@dataclass
class Listing:
    """A data set's usable rows before splits, and the rows left out so far."""
    where: str           # what error messages name: the CSV or the folder
    ids: list
    raw: list            # label text per row
    stamps: list
    skipped: list = field(default_factory=list)
    given: list = None   # the data set's own split per row, if any
    pixels: np.ndarray = None
    fingerprint: str = ""  # pixel layouts: of the source; file layouts: the header of the per-row digest

    def keep(self, rows):
        """Only `rows` (indices, in order) stay."""
        self.ids, self.raw, self.stamps = ([v[i] for i in rows] for v in (self.ids, self.raw, self.stamps))
        self.given = None if self.given is None else [self.given[i] for i in rows]
        self.pixels = None if self.pixels is None else self.pixels[rows]


def _file_stamp(path):
    """(stamp "size:mtime_ns", None) for a regular file, else (None, why it cannot be used)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None, "no such file"
    except (OSError, ValueError) as e:
        return None, cannot_read(e)
    if not stat.S_ISREG(st.st_mode):
        return None, "not a file"
    return f"{st.st_size}:{st.st_mtime_ns}", None


def data_csv_files(root):
    """The CSV files of a data set folder, sorted; hidden ones (`._labels.csv` from macOS) are not data."""
    return sorted(p for p in root.glob("*.csv") if not p.name.startswith(".") and p.is_file())


def the_csv(root):
    """The one CSV of a data set folder; several -> DataError: a second one must not decide the labels."""
    found = data_csv_files(root)
    if len(found) > 1:
        raise DataError(f"{root}: {len(found)} CSV files ({_and([p.name for p in found])}), cannot tell which "
                        f"holds the labels; keep one CSV in {root} and move the others out")
    return found[0]


def _read_csv(csv_path):
    """Non-blank rows of a CSV as (line number, fields); bad encoding or syntax -> DataError."""
    return list(_csv_rows(csv_path))


def csv_header(csv_path):
    """(line number, fields) of a CSV's first non-blank row, read alone; (1, []) for an empty file."""
    return next(_csv_rows(csv_path), (1, []))


def _csv_rows(csv_path):
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader, line = csv.reader(f), 1
            for row in reader:
                if any(field.strip() for field in row):
                    yield line, row
                line = reader.line_num + 1  # where the next record starts
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}: not a readable CSV ({e}); fix that line") from None


def _resolve(images, rel):
    """(images / rel) with symlinks and .. resolved -> (path, None), or (None, why no file has that name)."""
    try:
        return (images / rel).resolve(), None
    except RuntimeError:  # Python 3.11 reports a symlink loop so
        return None, "symlink loop"
    except (OSError, ValueError):  # an embedded NUL
        return None, "not a valid file name"


def _names_file(images, base, rel):
    """Whether `rel` names an existing file inside images/ (`base`: images/ resolved)."""
    path, _ = _resolve(images, rel)
    return path is not None and path.is_relative_to(base) and path.is_file()


def _file_column(images, header, rows):
    """The column naming the most existing files in images/ over the first rows (ties: the leftmost)."""
    base, sample = images.resolve(), [row for _, row in rows[:FILE_COLUMN_SAMPLE]]
    hits = [sum(c < len(row) and _names_file(images, base, row[c]) for row in sample) for c in range(len(header))]
    best = max(range(len(hits)), key=lambda c: (hits[c], -c))
    return best if hits[best] else None


def _label_column(csv_path, header, file_col):
    others = [c for c in range(len(header)) if c != file_col]
    named = [c for c in others if header[c].strip().lower() in LABEL_COLUMNS]
    if named or len(others) == 1:
        return (named or others)[0]
    raise DataError(f"{csv_path}: cannot tell the label column among {[header[c] for c in others]}; "
                    f"name it one of {', '.join(LABEL_COLUMNS)}")


class _CsvRow(NamedTuple):
    line: int
    id: str       # images/<file as written>
    label: str
    stamp: str
    path: Path    # the file, resolved: rows spelling it differently are the same file


def read_csv_images(root):
    csv_path = the_csv(root)
    rows = _read_csv(csv_path)
    if len(rows) < 2 or len(rows[0][1]) < 2:
        raise DataError(f"{csv_path}: needs a header and rows of `file,label`")
    (_, header), rows = rows[0], rows[1:]
    images = root / "images"
    file_col = _file_column(images, header, rows)
    if file_col is None:
        raise DataError(f"{csv_path}: no column names a file in {images} (first row: {rows[0][1]}); "
                        "the CSV must name each image file relative to images/")
    if _names_file(images, images.resolve(), header[file_col]):  # no header line: its first image is not one
        raise DataError(f"{csv_path}: its first line names an image ({header[file_col]}), not a column; "
                        "put a header line first, e.g. `file,label`")
    label_col = _label_column(csv_path, header, file_col)
    usable, skipped = [], []  # skipped: (line, id, reason)
    for line, row in rows:
        if len(row) <= max(file_col, label_col) or any(v.strip() for v in row[len(header):]):
            raise DataError(f"{csv_path}:{line}: row has {len(row)} fields, expected {len(header)}; fix that line")
        rel, label = row[file_col], row[label_col].strip()
        path, stamp, reason = _csv_row_file(csv_path, line, images, rel)
        if reason is None and not label:
            reason = "empty label"
        if reason:
            skipped.append((line, f"images/{rel}", f"{reason} ({csv_path.name} line {line})"))
        else:
            usable.append(_CsvRow(line, f"images/{rel}", label, stamp, path))
    kept, relisted = _drop_relisted(usable)
    listing = Listing(str(csv_path), [r.id for r in kept], [r.label for r in kept], [r.stamp for r in kept],
                       fingerprint=f"csv:{csv_path.name}:{header[label_col]}\n")
    listing.skipped = [(rel, reason) for _, rel, reason in sorted(skipped + relisted, key=lambda s: s[0])]
    return listing


def _csv_row_file(csv_path, line, images, rel):
    """The file a CSV row names -> (resolved path, stamp, None) or (.., .., why the row is skipped).
    A path leading out of images/ (.., absolute, a symlink out) is a DataError: it is never read."""
    if not rel.strip():
        return None, None, "empty file name"
    path, reason = _resolve(images, rel)
    if reason:
        return None, None, reason
    if not path.is_relative_to(images.resolve()):
        raise DataError(f"{csv_path}:{line}: {rel!r} points outside {images}; "
                        "the CSV may only name files inside images/")
    stamp, reason = _file_stamp(path)
    return path, stamp, reason


def _drop_relisted(rows):
    """Rows naming the same file: one label -> keep the first; several -> skip them all (never guess).
    Returns (kept rows, skipped as (line, id, reason))."""
    by_file = defaultdict(list)
    for row in rows:
        by_file[row.path].append(row)
    kept, skipped = [], []
    for row in rows:
        group = by_file[row.path]
        labels = list(dict.fromkeys(r.label for r in group))
        if len(labels) > 1:
            times = "twice" if len(group) == 2 else f"{len(group)} times"
            lines = _and([str(r.line) for r in group])
            skipped.append((row.line, row.id, f"listed {times} with labels {_and(labels)} (lines {lines})"))
        elif row is not group[0]:
            skipped.append((row.line, row.id, f"duplicate of {group[0].id} (line {group[0].line})"))
        else:
            kept.append(row)
    return kept, skipped


def _and(items):
    """'a', 'a and b', 'a, b and c'."""
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def read_image_folder(root):
    subdirs = _folders(root)
    split_dirs = _split_folders(root, subdirs)
    tops = list(split_dirs) if split_dirs else [root]
    listing = Listing(str(root), [], [], [], given=[] if split_dirs else None, fingerprint="imagefolder\n")
    for top in tops:
        for class_dir in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(p for p in class_dir.rglob("*") if is_image_file(p)):
                _list_folder_image(listing, root, path, class_dir.name, split_dirs.get(top))
    if not listing.ids and not listing.skipped:
        raise DataError(f"{root}: no images found in class folders; expected {root}/<class>/<image> "
                        f"or {root}/train/<class>/<image>")
    return listing


def _folders(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_folders(root, subdirs):
    """{folder: split} of the split folders (train/, val/, test/, ...) that hold class folders; {} where
    none does (a class folder may be named like a split: trains among vehicles). Class folders beside
    split folders -> DataError: which layout is meant cannot be told."""
    splits = {p: SPLIT_FOLDERS[p.name.lower()] for p in subdirs if p.name.lower() in SPLIT_FOLDERS and _folders(p)}
    beside = [p.name for p in subdirs if p not in splits and any(not q.name.startswith(".") for q in p.iterdir())]
    if splits and beside:
        raise DataError(f"{root}: class folders ({_and(beside)}) beside split folders that hold class folders "
                        f"({_and([p.name for p in splits])}); move each class folder under a split folder "
                        f"({root}/train/<class>/<image>), or rename a class folder named like a split")
    return splits


def escaped_name(name):
    """None when `name` is valid UTF-8; else its bytes escaped (`\\xNN`), as the skipped rows show it. A name
    that is not UTF-8 on disk comes back from the file system with surrogate escapes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return None


def _list_folder_image(listing, root, path, label, split):
    """Add one image of a class folder to the listing, or to its skipped rows."""
    rel = path.relative_to(root).as_posix()
    shown = escaped_name(rel)
    if shown is not None:
        listing.skipped.append((shown, NOT_UTF8))
        return
    stamp, reason = _file_stamp(path)
    if reason:
        listing.skipped.append((rel, reason))
        return
    listing.ids.append(rel)
    listing.raw.append(label)
    listing.stamps.append(stamp)
    if listing.given is not None:
        listing.given.append(split)
