"""Image files to RGB pictures: read once, decoded safely, or refused with a reason.

    data = read_image_bytes(path)          # ImageDecodeError("no such file"), ("empty file (0 bytes)"), ...
    image = decode_image(data, draft=256)  # RGB PIL image; large JPEGs decoded at reduced scale
    image, sha256 = load_file(path)        # both, reading the file once

Every way a file can be bad (truncated, not an image, over the decompression-bomb
limit, corrupt) becomes an ImageDecodeError whose message is the short reason stage
one records when it skips the image. Every way a picture can be odd (CMYK, 16-bit,
alpha, palette, animation, EXIF rotation) becomes a plain RGB image.
"""
import hashlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from .errors import ImageDecodeError

DRAFT_FACTOR = 2      # JPEG draft decoding only for images at least this much larger than needed

# PIL warns of images between 1x and 2x its pixel limit; check_pixel_count refuses them with a reason,
# so the warning (two lines of PIL's, in the middle of a progress bar) says nothing more.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def read_image_bytes(path):
    """The bytes of an image file; a missing, unreadable or empty file -> ImageDecodeError."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageDecodeError("no such file") from None
    except (OSError, ValueError) as e:
        raise ImageDecodeError(cannot_read(e)) from None
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    return data


def load_file(path, draft=None):
    """An image file -> (RGB PIL image, sha256 hex of its bytes), reading it once (see decode_image)."""
    return load_bytes(read_image_bytes(path), draft)


def load_bytes(data, draft=None):
    """An image file's bytes -> (RGB PIL image, sha256 hex of the bytes) (see decode_image)."""
    return decode_image(data, draft), hashlib.sha256(data).hexdigest()


def decode_image(data, draft=None):
    """Image file bytes -> RGB PIL image (see to_rgb; `draft` as in draft_decode). Anything but a whole,
    decodable image within PIL's decompression-bomb limit -> ImageDecodeError with a short reason."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never padded with grey
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: the size is known, no pixel decoded yet
            check_pixel_count(img.size[0] * img.size[1])
            if draft:
                draft_decode(img, draft)
            return to_rgb(img)  # an animated image gives its first frame
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise ImageDecodeError(_decode_failure(e)) from None


def check_pixel_count(n):
    """PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; such images are refused here, never decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and n > limit:
        raise ImageDecodeError(f"larger than the decompression-bomb limit ({n} pixels > {limit})")


def _decode_failure(e):
    """A PIL exception -> the short reason an image is skipped."""
    text = one_line(e)
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        found = re.search(r"\((\d+) pixels\)", text)
        if found:
            return f"larger than the decompression-bomb limit ({found[1]} pixels > {Image.MAX_IMAGE_PIXELS})"
    if isinstance(e, UnidentifiedImageError):
        return "not an image (cannot identify format)"
    if isinstance(e, EOFError) or "truncated" in text:
        return "truncated image data"
    if "broken data stream" in text:
        return "corrupt image data (broken data stream)"
    return f"cannot decode: {text or type(e).__name__}"


def cannot_read(e):
    """An OSError (or a ValueError for a NUL in the name) -> 'cannot read: permission denied'."""
    return f"cannot read: {one_line(getattr(e, 'strerror', None) or e).lower()}"


def one_line(value, limit=200):
    return " ".join(str(value).split())[:limit]


def draft_decode(img, size):
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: 2-4x faster), never below
    `size` on its shorter side, and only when it is at least DRAFT_FACTOR times that: smaller images
    decode exactly as without draft. Call before the pixels are loaded. Returns the scale used."""
    if not isinstance(img, JpegImageFile) or min(img.size) < DRAFT_FACTOR * size:  # MPO (phones) is a JPEG too
        return 1
    img.draft(img.mode, (size, size))  # scale = largest of 8, 4, 2 keeping both sides >= size
    return img.decoderconfig[0] if img.decoderconfig else 1


def to_rgb(img):
    """Any PIL image -> RGB: EXIF orientation applied, alpha over white, 16-bit scaled. `img` (a
    freshly opened file) is decoded and turned upright in place, and an RGB image is returned as
    itself: a photo is not copied on its way to the resize."""
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
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
    return img if img.mode == "RGB" else img.convert("RGB")
