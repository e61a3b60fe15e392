"""Bad image files: each decodes to the right RGB pixels or raises ImageDecodeError with its reason.

`ImageTable.load` reads a file once and gives (RGB image, sha256 of the bytes); stage one
records an ImageDecodeError's message as the reason the row is skipped.
"""
import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import write_image
from pipeline.datasets import ImageTable
from pipeline.images import decode_image
from pipeline.errors import DataError, ImageDecodeError


def table_of(root, *names):
    """An ImageTable over files `names` in `root`, as stage one reads them."""
    n = len(names)
    return ImageTable("t", "imagefolder", root, list(names), np.zeros(n, dtype=np.int64), ["a"],
                      np.array(["train"] * n), "given", "")


def load(path):
    """(image, sha256) of one file through ImageTable.load."""
    return table_of(path.parent, path.name).load(0)


def reason(path):
    with pytest.raises(ImageDecodeError) as e:
        load(path)
    return str(e.value)


def jpeg_bytes(size=(64, 48), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb16(values):
    """A 16-bit-per-channel RGB PNG (colour type 2, depth 16), which PIL cannot write. values: uint16 [H, W, 3]."""
    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------
# Files that are skipped, with their reason


def test_missing_file(tmp_path):
    assert reason(tmp_path / "gone.jpg") == "no such file"


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason(tmp_path / "empty.jpg") == "empty file (0 bytes)"


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    assert reason(tmp_path / "dir.jpg") == "cannot read: is a directory"


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg(tmp_path, cut):
    data = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * cut)])
    assert reason(tmp_path / "cut.jpg") == "truncated image data"


def test_truncated_png(tmp_path):
    write_image(tmp_path / "whole.png", size=(64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "cut.png") == "truncated image data"


def test_truncated_jpeg_skipped_even_when_pil_is_told_to_pad(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might leave it
    data = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "cut.jpg") == "truncated image data"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("image_names,emergency_or_not\n1.jpg,0\n")
    assert reason(tmp_path / "notes.jpg") == "not an image (cannot identify format)"


def test_corrupt_png_chunk(tmp_path):
    write_image(tmp_path / "ok.png", size=(16, 16))
    data = bytearray((tmp_path / "ok.png").read_bytes())
    start = data.index(b"IDAT") + 6
    data[start:start + 8] = b"\xff" * 8  # inside the compressed pixels
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert reason(tmp_path / "bad.png") == "corrupt image data (broken data stream)"


def bomb_png(path, size):
    Image.new("RGB", size, (1, 2, 3)).save(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size, pixels", [((40, 40), 1600),    # 1x-2x the limit: PIL only warns
                                          ((70, 70), 4900)])   # over 2x: PIL raises
def test_image_over_the_decompression_bomb_limit(tmp_path, monkeypatch, size, pixels):
    bomb_png(tmp_path / "bomb.png", size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))  # never decoded
    assert reason(tmp_path / "bomb.png") == f"larger than the decompression-bomb limit ({pixels} pixels > 1000)"


def test_bomb_warning_raised_as_error_gives_the_same_reason(tmp_path, monkeypatch):
    bomb_png(tmp_path / "bomb.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert reason(tmp_path / "bomb.png") == "larger than the decompression-bomb limit (1600 pixels > 1000)"


def test_image_at_the_bomb_limit_decodes(tmp_path, monkeypatch):
    bomb_png(tmp_path / "edge.png", (40, 25))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    img, _ = load(tmp_path / "edge.png")
    assert img.size == (40, 25) and img.getpixel((0, 0)) == (1, 2, 3)


def test_decode_error_is_a_data_error_and_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError) as e:
        load(tmp_path / "x.png")
    assert isinstance(e.value, ImageDecodeError) and "\n" not in str(e.value) and str(e.value)


def test_keyboard_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    write_image(tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        load(tmp_path / "ok.png")


# ---------------------------------------------------------------------------
# Unusual images that decode, with the right pixels and the hash of their bytes


def test_load_returns_the_sha256_of_the_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    img, digest = load(tmp_path / "a.jpg")
    assert digest == hashlib.sha256((tmp_path / "a.jpg").read_bytes()).hexdigest()
    assert img.mode == "RGB" and img.size == (64, 48)


def test_load_with_draft_matches_load_image(tmp_path):
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(size=(800, 600)))
    table = table_of(tmp_path, "big.jpg")
    img, digest = table.load(0, draft=224)
    assert img.size == (400, 300)  # decoded at 1/2 scale, not below 224
    assert np.array_equal(np.asarray(img), np.asarray(table.load_image(0, draft=224)))
    assert digest == hashlib.sha256((tmp_path / "big.jpg").read_bytes()).hexdigest()


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as src:
        assert src.n_frames == 3
    img, _ = load(tmp_path / "anim.gif")
    assert img.mode == "RGB" and img.size == (8, 6)
    assert img.getpixel((4, 3)) == (255, 0, 0)


def test_16_bit_rgb_png(tmp_path):
    values = np.zeros((2, 3, 3), np.uint16)
    values[0, 0] = (65535, 0, 32896)
    values[1, 2] = (0, 65535, 65535)
    (tmp_path / "rgb16.png").write_bytes(png_rgb16(values))
    img, _ = load(tmp_path / "rgb16.png")
    assert img.mode == "RGB" and img.size == (3, 2)
    assert img.getpixel((0, 0)) == (255, 0, 128)
    assert img.getpixel((2, 1)) == (0, 255, 255)


@pytest.mark.parametrize("mode, fmt, expect", [
    ("CMYK", "JPEG", None),            # colours checked loosely: JPEG is lossy
    ("I;16", "PNG", (255, 255, 255)),
    ("RGBA", "PNG", (255, 255, 255)),  # fully transparent corner over white
    ("LA", "PNG", (255, 255, 255)),
    ("P", "PNG", (200, 30, 30)),
    ("L", "WEBP", None),
    ("RGB", "TIFF", (200, 30, 30)),
    ("RGB", "BMP", (200, 30, 30)),
])
def test_modes_and_formats_decode_to_rgb(tmp_path, mode, fmt, expect):
    img = Image.new("RGB", (10, 7), (200, 30, 30))
    if mode == "I;16":
        img = Image.fromarray(np.full((7, 10), 65535, np.uint16))
    elif mode in ("RGBA", "LA"):
        img = img.convert(mode)
        img.putpixel((0, 0), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    else:
        img = img.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, fmt)
    out, digest = load(path)
    assert out.mode == "RGB" and out.size == (10, 7)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    if expect:
        assert out.getpixel((0, 0)) == expect
    if mode == "CMYK":
        r, g, b = np.asarray(out).reshape(-1, 3).mean(axis=0)
        assert r > g + 50 and r > b + 50  # still red, not inverted


def test_exif_rotated_jpeg_through_load(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    Image.fromarray(a).save(tmp_path / "turned.jpg", exif=exif)
    img, _ = load(tmp_path / "turned.jpg")
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[2] > 200 and top[0] < 50      # right half (blue) became the top
    assert bottom[0] > 200 and bottom[2] < 50


def test_decode_image_on_bytes(tmp_path):
    img = decode_image(jpeg_bytes(size=(30, 20)))
    assert img.mode == "RGB" and img.size == (30, 20)
    with pytest.raises(ImageDecodeError, match="^not an image"):
        decode_image(b"GIF89a\x00\x00")
