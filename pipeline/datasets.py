"""Data sets: find the images, their labels and their splits; decode to RGB.

`load_dataset(name, data_dir)` looks at `data_dir/name/` and recognises:

    csv          images/ + a CSV naming each file and its label (the vehicles layout)
    imagefolder  class folders, directly or under split folders (train/ val/ test/, ...)
    pixels       one CSV: a label column (`y` or `label`) + one column per pixel of a
                 square grayscale image (the Fashion-MNIST CSV layout)
    digits       scikit-learn's bundled 8x8 digits, needing no file (offline default)

It returns an `ImageTable`: ids, integer labels, class names, a split per row, a
stamp per row and a fingerprint of the content, plus `load(i)` that gives an RGB PIL
image (EXIF orientation applied) and the sha256 of the bytes it came from.

Hostile input never crashes the listing or shifts a label. Rows that cannot be used
(a missing file, an empty label, a file listed twice, a name that is not UTF-8; with
`drop_duplicates`, a byte-identical copy of another image) are left out and recorded
in `table.skipped` as (id, reason); a label is never guessed. A file that cannot be
decoded raises `ImageDecodeError` whose message is the reason, for stage one to
record. Paths leading out of the data set, unreadable CSVs and data sets with no
usable row are `DataError`s. No torch here: stage one wraps the table.
"""
import csv
import hashlib
import os
import stat
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .errors import DataError, ImageDecodeError
from .images import cannot_read, decode_image, one_line, read_image_bytes

LAYOUTS = ("csv", "imagefolder", "pixels", "digits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
LABEL_COLUMNS = ("label", "labels", "y", "class", "target", "category")
VAL_FRACTION = 0.15   # of the whole set, when the data set brings no val split
TEST_FRACTION = 0.15  # likewise for test
MIN_CLASS_TO_DRAW = 3  # smaller classes stay in train: one image per split is the least a draw can give
FILE_COLUMN_SAMPLE = 100  # CSV rows looked at to tell which column names the files
NOT_UTF8 = "file name is not valid UTF-8; rename it"


@dataclass
class ImageTable:
    """Everything stage one needs to know about a data set, one row per image."""
    name: str
    layout: str
    root: Path
    ids: list            # relative file path, or row number for pixel data
    labels: np.ndarray   # int64 [N], index into class_names
    class_names: list
    split: np.ndarray    # str [N], "train" | "val" | "test"
    split_source: str    # "folders" or how the split was drawn
    fingerprint: str     # sha256 of ids, labels, file sizes/mtimes (or pixel bytes) and skipped rows
    pixels: np.ndarray = field(default=None, repr=False)  # uint8 [N, H, W] for pixel layouts
    skipped: list = field(default_factory=list)  # (id, reason) of listed rows left out before extraction
    stamps: list = field(default_factory=list)   # per row: "size:mtime_ns" of its file, or sha256 of its pixels
    drop_duplicates: bool = False                # rows with the same content as another were left out

    def __len__(self):
        return len(self.ids)

    def load(self, i, draft=None):
        """Row i -> (RGB PIL image, sha256 hex of its file's bytes or of its pixel bytes), reading the
        file once. `draft` (a size) lets large JPEGs decode at reduced scale. A file that cannot be read
        or decoded raises ImageDecodeError whose message is the reason."""
        if self.pixels is not None:
            row = self.pixels[i]
            return Image.fromarray(row, mode="L").convert("RGB"), hashlib.sha256(row.tobytes()).hexdigest()
        data = read_image_bytes(self.root / self.ids[i])
        return decode_image(data, draft), hashlib.sha256(data).hexdigest()

    def load_image(self, i, draft=None):
        """Row i as an RGB PIL image (see load)."""
        return self.load(i, draft)[0]


def content_sha256(source, ids=None, pixels=None):
    """sha256 hex of each row's content, as ImageTable.load gives it: of the file's bytes (None for a
    file that cannot be read; extraction skips it with the reason) or of the row's pixel bytes.
    `source`: an ImageTable, or the data set's root with `ids` (and `pixels` for pixel layouts)."""
    if isinstance(source, ImageTable):
        source, ids, pixels = source.root, source.ids, source.pixels
    if pixels is not None:
        return [hashlib.sha256(row.tobytes()).hexdigest() for row in pixels]
    hashes = []
    for rel in ids:
        try:
            hashes.append(hashlib.sha256(read_image_bytes(Path(source) / rel)).hexdigest())
        except ImageDecodeError:
            hashes.append(None)
    return hashes


# ---------------------------------------------------------------------------
# Tables


@dataclass
class _Listing:
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
        if self.given is not None:
            self.given = [self.given[i] for i in rows]
        if self.pixels is not None:
            self.pixels = self.pixels[rows]


def load_dataset(name, data_dir="data", seed=0, drop_duplicates=False):
    """Read data set `name` under `data_dir` -> ImageTable (see module docstring). `drop_duplicates`:
    leave out rows whose content is byte-identical to another row's (all of them if labels disagree)."""
    root = Path(data_dir) / name
    if name == "digits" and not root.exists():
        return _make_table("digits", "digits", Path("sklearn:digits"), _digits(), seed, drop_duplicates)
    if not root.is_dir():
        raise DataError(f"{root}: no such data set folder; put the data there (see data/README.md) "
                        f"or point DATA_DIR at the folder that holds {name}/")
    if (root / "images").is_dir() and sorted(root.glob("*.csv")):
        return _make_table(name, "csv", root, _csv_images(root), seed, drop_duplicates)
    if sorted(root.glob("*.csv")):
        return _make_table(name, "pixels", root, _pixel_csv(root), seed, drop_duplicates)
    if any(_is_image(p) for p in root.rglob("*")):
        return _make_table(name, "imagefolder", root, _image_folder(root), seed, drop_duplicates)
    raise DataError(f"{root}: no layout recognised (images/ + CSV, class folders, or a pixel CSV); "
                    "see data/README.md for the layouts")


def _make_table(name, layout, root, listing, seed, drop_duplicates):
    """Listing -> ImageTable: optional duplicate removal, classes, splits and the fingerprint."""
    if drop_duplicates:
        _drop_same_content(root, listing)
    if not listing.ids:
        first = "; ".join(f"{i}: {reason}" for i, reason in listing.skipped[:3])
        raise DataError(f"{listing.where}: all {len(listing.skipped)} listed images were skipped "
                        f"(first: {first}); fix those rows or files")
    labels, class_names = _classes(listing.raw)
    split, how = draw_splits(labels, seed, given=listing.given, class_names=class_names)
    fingerprint = _fingerprint(listing, drop_duplicates)
    return ImageTable(name, layout, root, listing.ids, labels, class_names, split, how, fingerprint,
                      listing.pixels, listing.skipped, listing.stamps, drop_duplicates)


def _fingerprint(listing, drop_duplicates):
    """sha256 of the rows (ids, labels, sizes and mtimes; pixel layouts: the source's hash) and, only
    when there are any, of the skipped rows and the duplicate rule: clean data keeps its fingerprint."""
    if listing.pixels is not None:
        digest = listing.fingerprint
    else:
        rows = hashlib.sha256(listing.fingerprint.encode())
        for rel, label, stamp in zip(listing.ids, listing.raw, listing.stamps):
            size, mtime_ns = stamp.split(":")
            rows.update(f"{rel}\t{label}\t{size}\t{mtime_ns}\n".encode())
        digest = rows.hexdigest()
    if not listing.skipped and not drop_duplicates:
        return digest
    extra = hashlib.sha256(f"{digest}\ndrop_duplicates={drop_duplicates}\n".encode())
    for rel, reason in listing.skipped:
        extra.update(f"skipped\t{rel}\t{reason}\n".encode())
    return extra.hexdigest()


def _drop_same_content(root, listing):
    """Rows with byte-identical content: one label -> keep the first; several -> skip them all."""
    hashes = content_sha256(root, listing.ids, listing.pixels)
    groups = defaultdict(list)
    for row, digest in enumerate(hashes):
        if digest is not None:
            groups[digest].append(row)
    reasons = {}
    for rows in groups.values():
        labels = {listing.raw[r] for r in rows}
        for r in rows[1:] if len(labels) == 1 else rows:
            others = [listing.ids[o] for o in rows if listing.raw[o] != listing.raw[r]]
            reasons[r] = (f"same content as {_some(others)} with other labels" if others
                          else f"same content as {listing.ids[rows[0]]}")
    listing.skipped += [(listing.ids[r], reasons[r]) for r in sorted(reasons)]
    listing.keep([r for r in range(len(hashes)) if r not in reasons])


def _some(items, shown=3):
    """'a, b, c' or 'a, b, c and 4 more'."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(str(i) for i in items[:shown]) + more


def _is_image(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


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


def _classes(raw_labels):
    """Raw label values -> (int labels, sorted class names); numbers sort numerically."""
    names = sorted(set(raw_labels), key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0, v))
    index = {v: i for i, v in enumerate(names)}
    return np.array([index[v] for v in raw_labels], dtype=np.int64), names


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Splits


def draw_splits(labels, seed, given=None, class_names=None):
    """Splits per row: the data set's own (`given`), with any missing val/test split carved from
    train by a seeded, stratified draw. Classes with fewer than MIN_CLASS_TO_DRAW train images stay
    in train (named by `class_names` in the how). Returns (split, how it was made)."""
    labels = np.asarray(labels)
    split = np.array(given if given is not None else ["train"] * len(labels), dtype=object)
    missing = [s for s in ("test", "val") if not (split == s).any()]
    if not missing:
        return split.astype(str), "the data set's own split folders"
    from sklearn.model_selection import train_test_split  # only here: importing it takes ~1.5 s
    classes, counts = np.unique(labels[split == "train"], return_counts=True)
    small = classes[counts < MIN_CLASS_TO_DRAW]
    fractions = {"val": VAL_FRACTION, "test": TEST_FRACTION}
    share_left = 1.0
    for name in missing:
        rows = np.flatnonzero((split == "train") & ~np.isin(labels, small))
        if len(rows) == 0:
            raise _split_error(name, f"every class has fewer than {MIN_CLASS_TO_DRAW} train images"
                               if (split == "train").any() else "no train images to draw it from")
        try:
            _, taken = train_test_split(rows, test_size=fractions[name] / share_left,
                                        random_state=seed, stratify=labels[rows])
        except ValueError as e:
            raise _split_error(name, one_line(e)) from None
        split[taken] = name
        share_left -= fractions[name]
    how = f"stratified draw of {' and '.join(missing)} from train (seed {seed}, val {VAL_FRACTION}, test {TEST_FRACTION})"
    if len(small):
        names = [class_names[c] if class_names is not None else str(c) for c in small]
        how += f"; classes with fewer than {MIN_CLASS_TO_DRAW} images kept in train: {', '.join(names)}"
    return split.astype(str), how


def _split_error(name, why):
    return DataError(f"cannot draw a stratified {name} split: {why}; add images to the smallest class "
                     "or give the data set its own train/val/test folders")


# ---------------------------------------------------------------------------
# Layouts


def _read_csv(csv_path):
    """Non-blank rows of a CSV as (line number, fields); bad encoding or syntax -> DataError."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader, rows, line = csv.reader(f), [], 1
            for row in reader:
                if any(field.strip() for field in row):
                    rows.append((line, row))
                line = reader.line_num + 1  # where the next record starts
            return rows
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


def _csv_images(root):
    csv_path = sorted(root.glob("*.csv"))[0]
    rows = _read_csv(csv_path)
    if len(rows) < 2 or len(rows[0][1]) < 2:
        raise DataError(f"{csv_path}: needs a header and rows of `file,label`")
    (_, header), rows = rows[0], rows[1:]
    images = root / "images"
    file_col = _file_column(images, header, rows)
    if file_col is None:
        raise DataError(f"{csv_path}: no column names a file in {images} (first row: {rows[0][1]}); "
                        "the CSV must name each image file relative to images/")
    label_col = _label_column(csv_path, header, file_col)
    usable, skipped = [], []  # skipped: (line, id, reason)
    for line, row in rows:
        if len(row) <= max(file_col, label_col):
            raise DataError(f"{csv_path}:{line}: row has {len(row)} fields, expected {len(header)}; fix that line")
        rel, label = row[file_col], row[label_col].strip()
        path, stamp, reason = _csv_row_file(csv_path, line, images, rel)
        if reason is None and not label:
            reason = f"empty label ({csv_path.name} line {line})"
        if reason:
            skipped.append((line, f"images/{rel}", reason))
        else:
            usable.append(_CsvRow(line, f"images/{rel}", label, stamp, path))
    kept, relisted = _drop_relisted(usable)
    listing = _Listing(str(csv_path), [r.id for r in kept], [r.label for r in kept], [r.stamp for r in kept],
                       fingerprint=f"csv:{csv_path.name}:{header[label_col]}\n")
    listing.skipped = [(rel, reason) for _, rel, reason in sorted(skipped + relisted, key=lambda s: s[0])]
    return listing


def _csv_row_file(csv_path, line, images, rel):
    """The file a CSV row names -> (resolved path, stamp, None) or (.., .., why the row is skipped).
    A path leading out of images/ (.., absolute, a symlink out) is a DataError: it is never read."""
    if not rel.strip():
        return None, None, f"empty file name ({csv_path.name} line {line})"
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


def _image_folder(root):
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = {p: SPLIT_FOLDERS[p.name.lower()] for p in subdirs if p.name.lower() in SPLIT_FOLDERS}
    tops = list(split_dirs) if split_dirs else [root]
    listing = _Listing(str(root), [], [], [], given=[] if split_dirs else None, fingerprint="imagefolder\n")
    for top in tops:
        for class_dir in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(p for p in class_dir.rglob("*") if _is_image(p)):
                _list_folder_image(listing, root, path, class_dir.name, split_dirs.get(top))
    if not listing.ids and not listing.skipped:
        raise DataError(f"{root}: no images found in class folders; expected {root}/<class>/<image> "
                        f"or {root}/train/<class>/<image>")
    return listing


def _list_folder_image(listing, root, path, label, split):
    """Add one image of a class folder to the listing, or to its skipped rows."""
    rel = path.relative_to(root).as_posix()
    try:
        rel.encode("utf-8")  # a name that is not UTF-8 on disk comes back with surrogate escapes
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
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


def _pixel_csv(root):
    csv_path = sorted(root.glob("*.csv"))[0]
    header = (_read_csv(csv_path) or [(1, [])])[0][1]
    label_cols = [c for c, h in enumerate(header) if h.strip().lower() in ("y", "label")]
    if not label_cols:
        raise DataError(f"{csv_path}: a pixel CSV needs a label column named `y` or `label`; "
                        f"found {header[:3]}...")
    n_pixels = len(header) - 1
    side = int(round(n_pixels ** 0.5))
    if side * side != n_pixels:
        raise DataError(f"{csv_path}: {n_pixels} pixel columns is not a square image; "
                        "each row must hold one square grayscale image")
    try:
        with warnings.catch_warnings():  # a header alone: the check below says so in one line
            warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
            table = np.loadtxt(csv_path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2, encoding="utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: every value must be a number ({str(e)[:120]})") from None
    if table.shape[0] == 0 or table.shape[1] != len(header) or not np.isfinite(table).all():
        raise DataError(f"{csv_path}: needs rows of {len(header)} finite numbers under its header; "
                        f"found {table.shape[0]} rows of {table.shape[1]}")
    label_col = label_cols[0]
    raw = [str(int(v)) if float(v).is_integer() else str(v) for v in table[:, label_col]]
    values = np.delete(table, label_col, axis=1)
    if values.max(initial=0) <= 1.0:
        values = values * 255.0  # pixels stored as 0..1
    pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(-1, side, side)
    fingerprint = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    return _pixel_listing(str(csv_path), raw, pixels, fingerprint)


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    fingerprint = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()
    return _pixel_listing("sklearn:digits", [str(v) for v in labels], pixels, fingerprint)


def _pixel_listing(where, raw, pixels, fingerprint):
    """Rows of a pixel layout: ids are row numbers, stamps the sha256 of each row's pixels."""
    ids = [str(i) for i in range(len(raw))]
    return _Listing(where, ids, raw, content_sha256(None, ids, pixels), pixels=pixels, fingerprint=fingerprint)
