"""Data sets: the images, their labels and their splits, as one table.

    table = load_dataset("vehicles", "data")   # layouts: see layouts.py
    image, sha256 = table.load(0)              # an RGB PIL image and the hash of its file

`load_dataset(name, data_dir)` reads `data_dir/name/` in whichever layout it is
(`csv`, `imagefolder`, `pixels`, or the built-in `digits`) and returns an
`ImageTable`: ids, integer labels, class names, a split per row, a stamp per row and
a fingerprint of the content. It is an image source (see sources.py) for stage one.

Hostile input never crashes the listing or shifts a label. Rows that cannot be used
(see layouts.py; with `drop_duplicates`, a byte-identical copy of another image) are
left out and recorded in `table.skipped` as (id, reason). A file that cannot be
decoded raises `ImageDecodeError` whose message is the reason, for stage one to
record. Data sets with no usable row are `DataError`s. No torch here.
"""
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError, ImageDecodeError
from .images import load_file, one_line, read_image_bytes
from .layouts import data_csv_files, read_csv_images, read_image_folder
from .pixel_csv import pixel_sha256, read_digits, read_pixel_csv
from .sources import is_image_file

LAYOUTS = ("csv", "imagefolder", "pixels", "digits")
DIGITS = "sklearn:digits"  # where the built-in digits come from, in place of a folder
VAL_FRACTION = 0.15   # of the whole set, when the data set brings no val split
TEST_FRACTION = 0.15  # likewise for test
MIN_CLASS_TO_DRAW = 3  # smaller classes stay in train: one image per split is the least a draw can give


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
    own_splits: tuple = ("train",)               # the splits the data set gives (folders, files); the rest drawn

    def __len__(self):
        return len(self.ids)

    def load(self, i, draft=None):
        """Row i -> (RGB PIL image, sha256 hex of its file's bytes or of its pixel bytes), reading the
        file once. `draft` (a size) lets large JPEGs decode at reduced scale. A file that cannot be read
        or decoded raises ImageDecodeError whose message is the reason."""
        if self.pixels is not None:
            row = self.pixels[i]
            return Image.fromarray(row, mode="L").convert("RGB"), pixel_sha256(row[None])[0]
        return load_file(self.file(i), draft)

    def file(self, i):
        """The file row i is read from, or None when its pixels are in the table."""
        return None if self.pixels is not None else self.root / self.ids[i]

    @property
    def location(self):
        """Where the data set was read from, as `reopen_dataset` takes it: its folder, or `sklearn:digits`."""
        return str(self.root) if self.layout == "digits" else str(Path(self.root).resolve())

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
        return pixel_sha256(pixels)
    hashes = []
    for rel in ids:
        try:
            hashes.append(hashlib.sha256(read_image_bytes(Path(source) / rel)).hexdigest())
        except ImageDecodeError:
            hashes.append(None)
    return hashes


def load_dataset(name, data_dir="data", seed=0, drop_duplicates=False):
    """Read data set `name` under `data_dir` -> ImageTable (see module docstring). `drop_duplicates`:
    leave out rows whose content is byte-identical to another row's (all of them if labels disagree)."""
    root = Path(data_dir) / name
    if name == "digits" and not root.exists():
        return _make_table("digits", "digits", Path(DIGITS), read_digits(), seed, drop_duplicates)
    if not root.is_dir():
        raise DataError(f"{root}: no such data set folder; put the data there (see data/README.md) "
                        f"or point DATA_DIR at the folder that holds {name}/")
    if (root / "images").is_dir() and data_csv_files(root):
        return _make_table(name, "csv", root, read_csv_images(root), seed, drop_duplicates)
    if data_csv_files(root):
        if any(is_image_file(p) for p in root.iterdir()):
            raise DataError(f"{root}: a CSV beside image files; the CSV layout keeps its images in {root / 'images'}/ "
                            "(move them there), and a pixel CSV has no image files (data/README.md)")
        return _make_table(name, "pixels", root, read_pixel_csv(root), seed, drop_duplicates)
    if any(is_image_file(p) for p in root.rglob("*")):
        return _make_table(name, "imagefolder", root, read_image_folder(root), seed, drop_duplicates)
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
    own = tuple(sorted(set(listing.given))) if listing.given is not None else ("train",)
    return ImageTable(name, layout, root, listing.ids, labels, class_names, split, how, fingerprint,
                      listing.pixels, listing.skipped, listing.stamps, drop_duplicates, own)


def training_problem(labels, split, class_names):
    """What a head refuses in these rows, or None: one class only, or classes with no train image (a
    misspelled class folder under val/ or test/, say). Extract warns of it; train-head stops at it."""
    if len(class_names) < 2:
        return (f"one class only ({', '.join(map(str, class_names)) or 'none'}); a classifier needs at least two: "
                "add a folder (or labels) per class")
    missing = sorted(set(range(len(class_names))) - set(np.asarray(labels)[np.asarray(split) == "train"].tolist()))
    if missing:
        return (f"classes {[class_names[k] for k in missing]} have no train images (a misspelled folder?); "
                "add some or remove those classes")
    return None


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


def reopen_dataset(location, name, data_dir="data"):
    """The data set a cache or result was made from: at `location` (ImageTable.location) if that is
    still there, else `name` under `data_dir`."""
    if location == DIGITS:
        return load_dataset("digits")
    if isinstance(location, str) and location and Path(location).is_dir():
        return load_dataset(Path(location).name, Path(location).parent)
    return load_dataset(name, data_dir)


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
        # as many images as classes at least, as a stratified draw needs (at 3 images a class, one a split)
        size = max(int(np.ceil(fractions[name] / share_left * len(rows))), len(np.unique(labels[rows])))
        try:
            _, taken = train_test_split(rows, test_size=size, random_state=seed, stratify=labels[rows])
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
