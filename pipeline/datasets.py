"""Data sets: find the images, their labels and their splits; decode to RGB.

`load_dataset(name, data_dir)` looks at `data_dir/name/` and recognises:

    csv          images/ + a CSV naming each file and its label (the vehicles layout)
    imagefolder  class folders, directly or under split folders (train/ val/ test/, ...)
    pixels       one CSV: a label column (`y` or `label`) + one column per pixel of a
                 square grayscale image (the Fashion-MNIST CSV layout)
    digits       scikit-learn's bundled 8x8 digits, needing no file (offline default)

It returns an `ImageTable`: ids, integer labels, class names, a split per row and
a fingerprint of the content, plus `load_image(i)` that gives an RGB PIL image
with its EXIF orientation applied. No torch here: stage one wraps the table.
"""
import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from .errors import DataError

LAYOUTS = ("csv", "imagefolder", "pixels", "digits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
LABEL_COLUMNS = ("label", "labels", "y", "class", "target", "category")
VAL_FRACTION = 0.15   # of the whole set, when the data set brings no val split
TEST_FRACTION = 0.15  # likewise for test
DRAFT_FACTOR = 2      # JPEG draft decoding only for images at least this much larger than needed


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
    fingerprint: str     # sha256 of ids, labels and file sizes/mtimes (or pixel bytes)
    pixels: np.ndarray = field(default=None, repr=False)  # uint8 [N, H, W] for pixel layouts

    def __len__(self):
        return len(self.ids)

    def load_image(self, i, draft=None):
        """Row i as an RGB PIL image; `draft` (a size) lets large JPEGs decode at reduced scale."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels[i], mode="L").convert("RGB")
        with Image.open(self.root / self.ids[i]) as img:
            if draft:
                draft_decode(img, draft)
            return to_rgb(img)


def draft_decode(img, size):
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: 2-4x faster), never below
    `size` on its shorter side, and only when it is at least DRAFT_FACTOR times that: smaller images
    decode exactly as without draft. Call before the pixels are loaded. Returns the scale used."""
    if not isinstance(img, JpegImageFile) or min(img.size) < DRAFT_FACTOR * size:  # MPO (phones) is a JPEG too
        return 1
    img.draft(img.mode, (size, size))  # scale = largest of 8, 4, 2 keeping both sides >= size
    return img.decoderconfig[0] if img.decoderconfig else 1


def to_rgb(img):
    """Any PIL image -> RGB: EXIF orientation applied, alpha over white, 16-bit scaled."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        img = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_dataset(name, data_dir="data", seed=0):
    """Read data set `name` under `data_dir` -> ImageTable (see module docstring)."""
    root = Path(data_dir) / name
    if name == "digits" and not root.exists():
        return _digits(seed)
    if not root.is_dir():
        raise DataError(f"{root}: no such data set folder; put the data there (see data/README.md) "
                        f"or point DATA_DIR at the folder that holds {name}/")
    if (root / "images").is_dir() and sorted(root.glob("*.csv")):
        return _csv_images(name, root, seed)
    if sorted(root.glob("*.csv")):
        return _pixel_csv(name, root, seed)
    if any(_is_image(p) for p in root.rglob("*")):
        return _image_folder(name, root, seed)
    raise DataError(f"{root}: no layout recognised (images/ + CSV, class folders, or a pixel CSV); "
                    "see data/README.md for the layouts")


def _is_image(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _file_fingerprint(root, ids, labels, extra=""):
    digest = hashlib.sha256(extra.encode())
    for rel, label in zip(ids, labels):
        st = os.stat(root / rel)
        digest.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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


def draw_splits(labels, seed, given=None):
    """Splits per row: the data set's own (`given`), with any missing val/test split
    carved from train by a seeded, stratified draw. Returns (split, how it was made)."""
    labels = np.asarray(labels)
    split = np.array(given if given is not None else ["train"] * len(labels), dtype=object)
    missing = [s for s in ("test", "val") if not (split == s).any()]
    if not missing:
        return split.astype(str), "the data set's own split folders"
    from sklearn.model_selection import train_test_split  # only here: importing it takes ~1.5 s
    fractions = {"val": VAL_FRACTION, "test": TEST_FRACTION}
    share_left = 1.0
    for name in missing:
        train_rows = np.flatnonzero(split == "train")
        try:
            _, taken = train_test_split(train_rows, test_size=fractions[name] / share_left,
                                        random_state=seed, stratify=labels[train_rows])
        except ValueError as e:
            raise DataError(f"cannot draw a stratified {name} split: {e}; add images to the smallest class "
                            "or give the data set its own train/val/test folders") from None
        split[taken] = name
        share_left -= fractions[name]
    how = f"stratified draw of {' and '.join(missing)} from train (seed {seed}, val {VAL_FRACTION}, test {TEST_FRACTION})"
    return split.astype(str), how


def _read_csv(csv_path):
    """Non-blank rows of a CSV; bad encoding or syntax -> DataError."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            return [row for row in csv.reader(f) if any(field.strip() for field in row)]
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}: not a readable CSV ({e}); fix that line") from None


def _inside(root, rel):
    """root / rel if it names a file inside root (no ../, absolute paths or symlinks out), else None."""
    try:
        path = (root / rel).resolve()
        return path if path.is_relative_to(root.resolve()) and path.is_file() else None
    except (OSError, ValueError):  # embedded NUL, name too long
        return None


def _csv_images(name, root, seed):
    csv_path = sorted(root.glob("*.csv"))[0]
    rows = _read_csv(csv_path)
    if len(rows) < 2 or len(rows[0]) < 2:
        raise DataError(f"{csv_path}: needs a header and rows of `file,label`")
    header, rows = rows[0], rows[1:]
    images = root / "images"
    file_col = next((c for c in range(min(len(header), len(rows[0]))) if _inside(images, rows[0][c])), None)
    if file_col is None:
        raise DataError(f"{csv_path}: no column names a file in {images} (first row: {rows[0]}); "
                        "the CSV must name each image file relative to images/")
    others = [c for c in range(len(header)) if c != file_col]
    named = [c for c in others if header[c].strip().lower() in LABEL_COLUMNS]
    label_col = named[0] if named else others[0] if len(others) == 1 else None
    if label_col is None:
        raise DataError(f"{csv_path}: cannot tell the label column among {[header[c] for c in others]}; "
                        f"name it one of {', '.join(LABEL_COLUMNS)}")
    ids, raw = [], []
    for line, row in enumerate(rows, start=2):
        if len(row) <= max(file_col, label_col):
            raise DataError(f"{csv_path}:{line}: row has {len(row)} fields, expected {len(header)}")
        ids.append(f"images/{row[file_col]}")
        raw.append(row[label_col].strip())
    missing = [i for i in ids if not _inside(images, i[len("images/"):])]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} listed files do not exist inside {images} "
                        f"(first: {missing[0]!r}); fix the CSV or restore the files")
    labels, class_names = _classes(raw)
    split, how = draw_splits(labels, seed)
    fingerprint = _file_fingerprint(root, ids, raw, extra=f"csv:{csv_path.name}:{header[label_col]}\n")
    return ImageTable(name, "csv", root, ids, labels, class_names, split, how, fingerprint)


def _image_folder(name, root, seed):
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = {p: SPLIT_FOLDERS[p.name.lower()] for p in subdirs if p.name.lower() in SPLIT_FOLDERS}
    tops = list(split_dirs) if split_dirs else [root]
    ids, raw, given = [], [], []
    for top in tops:
        for class_dir in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(p for p in class_dir.rglob("*") if _is_image(p)):
                ids.append(path.relative_to(root).as_posix())
                raw.append(class_dir.name)
                given.append(split_dirs.get(top, ""))
    if not ids:
        raise DataError(f"{root}: no images found in class folders; expected {root}/<class>/<image> "
                        f"or {root}/train/<class>/<image>")
    labels, class_names = _classes(raw)
    split, how = draw_splits(labels, seed, given=given if split_dirs else None)
    fingerprint = _file_fingerprint(root, ids, raw, extra="imagefolder\n")
    return ImageTable(name, "imagefolder", root, ids, labels, class_names, split, how, fingerprint)


def _pixel_csv(name, root, seed):
    csv_path = sorted(root.glob("*.csv"))[0]
    header = (_read_csv(csv_path) or [[]])[0]
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
    labels, class_names = _classes(raw)
    split, how = draw_splits(labels, seed)
    fingerprint = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    ids = [str(i) for i in range(len(labels))]
    return ImageTable(name, "pixels", root, ids, labels, class_names, split, how, fingerprint, pixels)


def _digits(seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    split, how = draw_splits(labels, seed)
    fingerprint = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()
    ids = [str(i) for i in range(len(labels))]
    class_names = [str(c) for c in digits.target_names]
    return ImageTable("digits", "digits", Path("sklearn:digits"), ids, labels, class_names, split, how,
                      fingerprint, pixels)
