"""Pixel layouts: images stored as numbers, not files (see layouts.py for the others).

    pixels       one CSV: a label column (`y` or `label`) + one column per pixel of a
                 square grayscale image (the Fashion-MNIST CSV layout)
    digits       scikit-learn's bundled 8x8 digits, needing no file (offline default)

A row's id is its number and its stamp the sha256 of its pixels. A row of another
length than the header, or a value that is not a finite number, is a DataError naming
the line; numpy reads the file, and only a refused one is read again line by line.
"""
import hashlib
import math
import warnings

import numpy as np

from .errors import DataError
from .layouts import Listing, csv_header, the_csv

__all__ = ["pixel_sha256", "read_digits", "read_pixel_csv"]


def pixel_sha256(pixels):
    """sha256 hex of each row's pixel bytes: the content hash and stamp of pixel rows."""
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in pixels]


def read_pixel_csv(root):
    csv_path = the_csv(root)
    header_line, header = csv_header(csv_path)
    label_cols = [c for c, h in enumerate(header) if h.strip().lower() in ("y", "label")]
    if not label_cols:
        raise DataError(f"{csv_path}: a pixel CSV needs a label column named `y` or `label`; "
                        f"found {header[:3]}...")
    n_pixels = len(header) - 1
    side = int(round(n_pixels ** 0.5))
    if side * side != n_pixels:
        raise DataError(f"{csv_path}: {n_pixels} pixel columns is not a square image; "
                        "each row must hold one square grayscale image")
    table = _pixel_table(csv_path, header, header_line)
    label_col = label_cols[0]
    raw = [str(int(v)) if float(v).is_integer() else str(v) for v in table[:, label_col]]
    values = np.delete(table, label_col, axis=1)
    if values.max(initial=0) <= 1.0:
        values = values * 255.0  # pixels stored as 0..1
    pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(-1, side, side)
    fingerprint = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    return _pixel_listing(str(csv_path), raw, pixels, fingerprint)


def _pixel_table(csv_path, header, header_line):
    """The numbers under the header [rows, columns], read by numpy (fast). When numpy refuses the file,
    or it holds a row of another length or a value that is not finite, the lines are read again (slowly)
    to name the first bad one."""
    try:
        with warnings.catch_warnings():  # a header alone: the check below says so in one line
            warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
            table = np.loadtxt(csv_path, delimiter=",", skiprows=header_line, dtype=np.float64, ndmin=2,
                               encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except ValueError:
        table = None
    if table is not None and table.shape[0] and table.shape[1] == len(header) and np.isfinite(table).all():
        return table
    _raise_at_bad_pixel_line(csv_path, header, header_line)
    if table is None:  # numpy and the line-by-line reading disagree: say what every line needs
        raise DataError(f"{csv_path}: cannot read the lines under its header as numbers; each line must hold "
                        f"{len(header)} numbers separated by commas")
    raise DataError(f"{csv_path}: needs rows of {len(header)} finite numbers under its header; "
                    f"found {table.shape[0]} rows of {table.shape[1]}")


def _raise_at_bad_pixel_line(csv_path, header, header_line):
    """Read the lines under the header as np.loadtxt does (`#` starts a comment, empty lines are
    skipped, quotes are plain text) and raise a DataError at the first line that does not hold
    len(header) finite numbers."""
    with open(csv_path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, 1):
            text = text.rstrip("\n").split("#")[0]
            if line <= header_line or not text:
                continue
            values = text.split(",")
            if len(values) != len(header):
                raise DataError(f"{csv_path}:{line}: row has {len(values)} values, the header has {len(header)}; "
                                "fix that line")
            for c, value in enumerate(values):
                number = _number(value)
                if number is None or not math.isfinite(number):
                    name = header[c].strip() if header[c].strip().isprintable() else ""
                    if name.lower() in ("y", "label"):
                        raise DataError(f"{csv_path}:{line}: label {value.strip()[:40]!r} is not a class number; a "
                                        "pixel CSV's labels are numbers (0, 1, ...): number the classes")
                    raise DataError(f"{csv_path}:{line}: value {value.strip()[:40]!r} in column {name or c + 1} "
                                    f"is not {'a' if number is None else 'a finite'} number; fix that line")


def _number(text):
    """float(text), or None where numpy would not read it as a number (Python also takes `1_0`, `١`)."""
    if not text.isascii() or "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_digits():
    from sklearn.datasets import load_digits
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    fingerprint = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()
    return _pixel_listing("sklearn:digits", [str(v) for v in labels], pixels, fingerprint)


def _pixel_listing(where, raw, pixels, fingerprint):
    """Rows of a pixel layout: ids are row numbers, stamps the sha256 of each row's pixels."""
    ids = [str(i) for i in range(len(raw))]
    return Listing(where, ids, raw, pixel_sha256(pixels), pixels=pixels, fingerprint=fingerprint)
