"""Image sources, and the batch record that carries their images through stage one.

An image source is anything with `ids` (one string per row), `len()`,
`load(row, draft=None) -> (RGB PIL image, sha256 hex of its bytes)`, raising
ImageDecodeError with the reason for a file that cannot be used, and `file(row)`:
the file it reads (None when the pixels are in memory). Two kinds:

    datasets.ImageTable     a data set: rows with labels and splits (extract, sweep)
    ImageFiles(paths)       plain files, no labels (predict)

    files = ImageFiles(list_images(["photos/"]))
    image, sha256 = files.load(0)

A `Batch` is what travels from decoding to the forward pass to the cache writer:
the rows it holds, their pixels, their content hashes and why any failed to decode.
"""
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import DataError
from .images import load_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ImageSource(Protocol):
    ids: list

    def __len__(self) -> int: ...

    def load(self, row, draft=None): ...

    def file(self, row): ...


@dataclass
class Batch:
    """Rows of an image source on their way to the cache, one record from decode to writer."""
    rows: np.ndarray     # int64 [B], row indices in the source
    images: object       # torch uint8 (or float32) [B, 3, H, W]: zeros where decoding failed; None once on the device
    sha256: list         # [B] hex of each file's bytes, "" where it could not be read
    failures: list       # [B] why the image could not be decoded, "" if it was
    waited_s: float = 0.0  # how long the model waited for this batch to be decoded (0: not measured)

    def __len__(self):
        return len(self.rows)

    def pin_memory(self):
        """Called by the DataLoader (pin_memory=True): page-locked pixels copy to a GPU asynchronously."""
        return replace(self, images=self.images.pin_memory())


class ImageFiles:
    """Image files as a source: ids are the paths as given."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.ids = [str(p) for p in self.paths]

    def __len__(self):
        return len(self.paths)

    def load(self, row, draft=None):
        return load_file(self.paths[row], draft)

    def file(self, row):
        return self.paths[row]


def is_image_file(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _broken_link(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_symlink() and not path.exists()


def list_images(inputs):
    """Files as given, folders searched recursively for images; sorted, no duplicates."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if is_image_file(p) or _broken_link(p))  # gets a reason
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"{item}: no such file or folder; give image files or folders of images")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return list(dict.fromkeys(found))
