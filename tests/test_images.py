"""images.py and sources.py: image files to RGB pictures, or refused with the reason stage one records.

Every file here is read by each public loader: images.load_file, ImageTable.load and
sources.ImageFiles.load give the same image and the sha256 of the file's bytes (and
images.decode_image the same image from those bytes), or refuse it with the same
ImageDecodeError. JPEG draft decoding, and list_images finding files for predict, too.
"""
import hashlib
import io
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import textured, write_image, write_jpeg
from pipeline.datasets import ImageTable
from pipeline.errors import DataError, ImageDecodeError
from pipeline.images import decode_image, draft_decode, load_file
from pipeline.sources import IMAGE_EXTENSIONS, ImageFiles, list_images


def table_of(root, *names):
    """An ImageTable over files `names` in `root`, as stage one reads them."""
    n = len(names)
    return ImageTable("t", "imagefolder", root, list(names), np.zeros(n, dtype=np.int64), ["a"],
                      np.array(["train"] * n), "given", "")


LOADERS = {
    "images.load_file": load_file,
    "ImageTable.load": lambda path, draft=None: table_of(path.parent, path.name).load(0, draft),
    "ImageFiles.load": lambda path, draft=None: ImageFiles([path]).load(0, draft),
}


def load(path, draft=None):
    """(RGB image, sha256) of one file; every loader gives the same, the hash is of the file's bytes
    and decode_image gives the same pixels from those bytes."""
    data = path.read_bytes()
    image = decode_image(data, draft)
    assert image.mode == "RGB"
    for name, loader in LOADERS.items():
        other, digest = loader(path, draft)
        assert other.mode == "RGB" and np.array_equal(np.asarray(other), np.asarray(image)), name
        assert digest == hashlib.sha256(data).hexdigest(), name
    return image, digest


def assert_refused(path, reason):
    """Every loader refuses the file with ImageDecodeError(reason): that one line, nothing more."""
    for loader in LOADERS.values():
        with pytest.raises(ImageDecodeError, match=rf"\A{re.escape(reason)}\Z"):
            loader(path)


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
# Files that are refused, with their reason


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "gone.jpg", "no such file")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert_refused(tmp_path / "empty.jpg", "empty file (0 bytes)")


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    assert_refused(tmp_path / "dir.jpg", "cannot read: is a directory")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg(tmp_path, cut):
    data = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * cut)])
    assert_refused(tmp_path / "cut.jpg", "truncated image data")


def test_truncated_png(tmp_path):
    write_image(tmp_path / "whole.png", size=(64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path / "cut.png", "truncated image data")


def test_truncated_jpeg_skipped_even_when_pil_is_told_to_pad(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might leave it
    data = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path / "cut.jpg", "truncated image data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("image_names,emergency_or_not\n1.jpg,0\n")
    assert_refused(tmp_path / "notes.jpg", "not an image (cannot identify format)")


def test_corrupt_png_chunk(tmp_path):
    write_image(tmp_path / "ok.png", size=(16, 16))
    data = bytearray((tmp_path / "ok.png").read_bytes())
    start = data.index(b"IDAT") + 6
    data[start:start + 8] = b"\xff" * 8  # inside the compressed pixels
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert_refused(tmp_path / "bad.png", "corrupt image data (broken data stream)")


def bomb_png(path, size):
    Image.new("RGB", size, (1, 2, 3)).save(path)


@pytest.mark.parametrize("size, pixels", [((40, 40), 1600),    # 1x-2x the limit: PIL only warns
                                          ((70, 70), 4900)])   # over 2x: PIL raises
def test_image_over_the_decompression_bomb_limit(tmp_path, monkeypatch, size, pixels):
    bomb_png(tmp_path / "bomb.png", size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))  # never decoded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # pytest drops the filter images.py sets
        assert_refused(tmp_path / "bomb.png", f"larger than the decompression-bomb limit ({pixels} pixels > 1000)")


def test_an_image_refused_as_a_bomb_prints_no_warning_of_pils(tmp_path):
    """A fresh process (pytest keeps no filter set while it imports the tests): only the reason, no PIL warning."""
    bomb_png(tmp_path / "bomb.png", (40, 40))
    code = ("import sys; from PIL import Image; from pipeline.images import load_file; Image.MAX_IMAGE_PIXELS = 1000\n"
            "try: load_file(sys.argv[1])\nexcept Exception as e: print(e)")
    run = subprocess.run([sys.executable, "-c", code, tmp_path / "bomb.png"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True)
    assert run.stdout.strip() == "larger than the decompression-bomb limit (1600 pixels > 1000)" and run.stderr == ""


def test_bomb_warning_raised_as_error_gives_the_same_reason(tmp_path, monkeypatch):
    bomb_png(tmp_path / "bomb.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert_refused(tmp_path / "bomb.png", "larger than the decompression-bomb limit (1600 pixels > 1000)")


def test_image_at_the_bomb_limit_decodes(tmp_path, monkeypatch):
    bomb_png(tmp_path / "edge.png", (40, 25))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    img, _ = load(tmp_path / "edge.png")
    assert img.size == (40, 25) and img.getpixel((0, 0)) == (1, 2, 3)


def test_decode_error_is_a_data_error_and_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert issubclass(ImageDecodeError, DataError)
    assert_refused(tmp_path / "x.png", "not an image (cannot identify format)")


def test_keyboard_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    write_image(tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    for loader in LOADERS.values():
        with pytest.raises(KeyboardInterrupt):
            loader(tmp_path / "ok.png")


def test_decode_image_on_bytes():
    img = decode_image(jpeg_bytes(size=(30, 20)))
    assert img.mode == "RGB" and img.size == (30, 20)
    with pytest.raises(ImageDecodeError, match="^not an image"):
        decode_image(b"GIF89a\x00\x00")


# ---------------------------------------------------------------------------
# Unusual images that decode, with the right pixels and the hash of their bytes


def test_load_returns_the_sha256_of_the_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    img, digest = load_file(tmp_path / "a.jpg")
    assert digest == hashlib.sha256((tmp_path / "a.jpg").read_bytes()).hexdigest()
    assert img.mode == "RGB" and img.size == (64, 48)
    assert load(tmp_path / "a.jpg")[1] == digest


def test_image_files_load_as_load_file(tmp_path):
    paths = [write_image(tmp_path / "a.png", size=(9, 7)), write_jpeg(tmp_path / "sub" / "b.jpg", (600, 520)),
             write_image(tmp_path / "c.bmp", size=(5, 5), color=(1, 200, 3), fmt="BMP")]
    files = ImageFiles(paths)
    assert len(files) == 3 and files.ids == [str(p) for p in paths]
    for i, path in enumerate(paths):
        for draft in (None, 256):
            img, digest = files.load(i, draft)
            expected, expected_digest = load_file(path, draft)
            assert np.array_equal(np.asarray(img), np.asarray(expected)) and img.size == expected.size
            assert digest == expected_digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert files.load(1, draft=256)[0].size == (300, 260)  # the draft reaches the decoder


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
    assert img.size == (8, 6)
    assert img.getpixel((4, 3)) == (255, 0, 0)


def test_grayscale_l(tmp_path):
    write_image(tmp_path / "gray.png", size=(12, 7), mode="L")
    img, _ = load(tmp_path / "gray.png")
    assert img.size == (12, 7)
    rgb = np.asarray(img)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
    np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
    with Image.open(tmp_path / "gray.png") as src:
        np.testing.assert_array_equal(rgb[..., 0], np.asarray(src))


@pytest.mark.parametrize("options, left", [({}, (255, 0, 0)),
                                           ({"transparency": 0}, (255, 255, 255))],  # index 0 (red) over white
                         ids=["opaque", "transparent"])
def test_palette_with_and_without_transparency(tmp_path, options, left):
    img = Image.new("P", (10, 5))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (5, 0, 10, 5))
    img.save(tmp_path / "pal.png", **options)
    out, _ = load(tmp_path / "pal.png")
    assert out.size == (10, 5)
    assert out.getpixel((0, 0)) == left
    assert out.getpixel((9, 4)) == (0, 0, 255)


def test_rgba_composited_over_white(tmp_path):
    a = np.zeros((4, 6, 4), np.uint8)
    a[:, :3] = (10, 20, 30, 0)      # fully transparent
    a[:, 3:] = (10, 20, 30, 255)    # opaque
    a[0, 3] = (0, 0, 0, 128)        # half transparent black
    Image.fromarray(a, "RGBA").save(tmp_path / "alpha.png")
    out, _ = load(tmp_path / "alpha.png")
    assert out.size == (6, 4)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((5, 3)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((3, 0)))


def test_la_composited_over_white(tmp_path):
    a = np.zeros((3, 3, 2), np.uint8)
    a[..., 0] = 40
    a[0, 0, 1] = 255
    Image.fromarray(a, "LA").save(tmp_path / "la.png")
    out, _ = load(tmp_path / "la.png")
    assert out.size == (3, 3)
    assert out.getpixel((0, 0)) == (40, 40, 40)
    assert out.getpixel((2, 2)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    write_image(tmp_path / "cmyk.jpg", size=(16, 9), color=(200, 30, 30), mode="CMYK")
    with Image.open(tmp_path / "cmyk.jpg") as src:
        assert src.mode == "CMYK"
    out, _ = load(tmp_path / "cmyk.jpg")
    assert out.size == (16, 9)
    r, g, b = np.asarray(out).reshape(-1, 3).mean(axis=0)
    assert r > g + 50 and r > b + 50  # still red, not inverted


def test_16_bit_grayscale(tmp_path):
    values = np.array([[0, 65535, 32768], [65535, 0, 257]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as src:
        assert src.mode.startswith("I")
    out, _ = load(tmp_path / "deep.png")
    assert out.size == (3, 2)
    gray = np.asarray(out)[..., 0]
    assert gray[0, 0] == 0 and gray[1, 1] == 0
    assert gray[0, 1] == 255 and gray[1, 0] == 255
    assert gray[0, 2] in (127, 128)
    assert gray[1, 2] == 1


def test_16_bit_rgb_png(tmp_path):
    values = np.zeros((2, 3, 3), np.uint16)
    values[0, 0] = (65535, 0, 32896)
    values[1, 2] = (0, 65535, 65535)
    (tmp_path / "rgb16.png").write_bytes(png_rgb16(values))
    img, _ = load(tmp_path / "rgb16.png")
    assert img.size == (3, 2)
    assert img.getpixel((0, 0)) == (255, 0, 128)
    assert img.getpixel((2, 1)) == (0, 255, 255)


@pytest.mark.parametrize("mode, fmt, exact", [
    ("L", "WEBP", False),   # lossy: only mode and size
    ("RGB", "TIFF", True),
    ("RGB", "BMP", True),
])
def test_other_formats_decode_to_rgb(tmp_path, mode, fmt, exact):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (10, 7), (200, 30, 30)).convert(mode).save(path, fmt)
    out, _ = load(path)
    assert out.size == (10, 7)
    if exact:
        assert out.getpixel((0, 0)) == (200, 30, 30)


@pytest.mark.parametrize("orientation, top, bottom", [(6, 0, 2),    # 90 degrees clockwise: left (red) on top
                                                      (8, 2, 0)])   # counter-clockwise: right (blue) on top
def test_exif_orientation_applied(tmp_path, orientation, top, bottom):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "turned.jpg", exif=exif)
    out, _ = load(tmp_path / "turned.jpg")
    assert out.size == (20, 40)
    up, down = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert up[top] > 200 and up[bottom] < 50  # channel `top` is the colour now on top
    assert down[bottom] > 200 and down[top] < 50


# ---------------------------------------------------------------------------
# JPEG draft decoding


@pytest.mark.parametrize("size, scale, decoded", [
    ((1024, 768), 2, (512, 384)),     # 1/4 would give 192 < 256 on the short side
    ((2048, 1536), 4, (512, 384)),
    ((4000, 3000), 8, (500, 375)),
    ((768, 1024), 2, (384, 512)),     # portrait
    ((511, 400), 1, (511, 400)),      # shorter side under 2 x 256: decoded in full
    ((500, 375), 1, (500, 375)),
    ((224, 224), 1, (224, 224)),
])
def test_draft_reduces_only_large_jpegs_and_never_below_the_resize(tmp_path, size, scale, decoded):
    path = write_image(tmp_path / "x.jpg", size=size)
    with Image.open(path) as img:
        assert draft_decode(img, 256) == scale
        img.load()
        assert img.size == decoded
        assert scale == 1 or min(img.size) >= 256
    assert load(path, draft=256)[0].size == decoded


def test_draft_leaves_other_formats_alone(tmp_path):
    path = write_image(tmp_path / "big.png", size=(1024, 768))
    with Image.open(path) as img:
        assert draft_decode(img, 256) == 1
        assert img.size == (1024, 768)
    assert np.array_equal(np.asarray(load(path, draft=256)[0]), np.asarray(load(path)[0]))


def test_small_images_decode_exactly_as_without_draft(tmp_path):
    root = tmp_path / "small"
    write_jpeg(root / "a" / "vehicle.jpg", (224, 224))
    write_jpeg(root / "a" / "web.jpg", (500, 375), seed=1)
    write_image(root / "b" / "digit.png", size=(28, 28))
    textured((400, 400), 2).convert("L").save(root / "b" / "grey.jpg")
    ids = ["a/vehicle.jpg", "a/web.jpg", "b/digit.png", "b/grey.jpg"]
    table = table_of(root, *ids)
    for i, rel in enumerate(ids):
        assert np.array_equal(np.asarray(table.load_image(i, draft=256)), np.asarray(table.load_image(i)))
        assert np.array_equal(np.asarray(load(root / rel, draft=256)[0]), np.asarray(load(root / rel)[0]))


# ---------------------------------------------------------------------------
# Finding image files (predict)


def test_list_images_searches_folders_and_keeps_files_as_given(tmp_path):
    photos = tmp_path / "photos"
    first = write_image(photos / "b.png")
    nested = write_image(photos / "sub" / "deep" / "a.JPG", fmt="JPEG")  # any case of a known extension
    (photos / "notes.txt").write_text("not an image")
    (photos / "sub" / "labels.csv").write_text("file,label\n")
    write_image(photos / ".hidden.png")
    (photos / "folder.png").mkdir()  # a folder named like an image
    single = write_image(tmp_path / "one.bmp", fmt="BMP")
    found = list_images([photos, single, photos / "b.png"])  # b.png named again: listed once
    assert found == [first, nested, single]
    files = ImageFiles(found)
    assert files.ids == [str(p) for p in found] and files.load(1)[0].size == (32, 24)


def test_list_images_refuses_a_missing_path_and_a_folder_without_images(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"\A{re.escape(str(missing))}: no such file or folder; "
                                        r"give image files or folders of images\Z"):
        list_images([write_image(tmp_path / "a.png"), missing])
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"\Ano images \({re.escape(', '.join(IMAGE_EXTENSIONS))}\) "
                                        rf"in {re.escape(str(empty))}\Z"):
        list_images([empty])
