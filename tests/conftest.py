"""Shared fixtures. Real data and weights come from ../shared (PIPELINE_SHARED).

Under CI=true a missing ../shared is a failure, not a skip: the end-to-end
tests are the product's proof and must run there.
"""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIPELINE_SHARED", REPO.parent / "shared")).resolve()
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2-imagenet-dequantized.pth"


@pytest.fixture(scope="session")
def shared():
    """Path of ../shared; skips locally, fails under CI, when it is missing."""
    if not (SHARED / "data").is_dir() or not MOBILENET_WEIGHTS.is_file():
        message = f"real data and weights not found at {SHARED} (set PIPELINE_SHARED)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session")
def mobilenet_weights(shared):
    return MOBILENET_WEIGHTS


def write_image(path, size=(32, 24), color=(200, 30, 30), mode="RGB", fmt=None):
    """A small real image file (solid color with a gradient so it is not constant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    ramp = np.linspace(0, 1, w * h, dtype=np.float64).reshape(h, w, 1)
    rgb = (np.array(color, dtype=np.float64) * (0.5 + 0.5 * ramp)).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def small_vehicles(shared, tmp_path):
    """A 60-image copy of the vehicles data set (CSV layout), balanced, in tmp."""
    import csv
    src = shared / "data" / "vehicles"
    rows = list(csv.reader(open(src / "emergency_train.csv")))
    header, rows = rows[0], rows[1:]
    picked = [r for r in rows if r[1] == "0"][:30] + [r for r in rows if r[1] == "1"][:30]
    root = tmp_path / "data" / "vehicles"
    (root / "images").mkdir(parents=True)
    for name, _ in picked:
        (root / "images" / name).write_bytes((src / "images" / name).read_bytes())
    with open(root / "emergency_train.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + picked)
    return root


def assert_same_codes(actual, expected, rtol=1e-4):
    """Codes equal within `rtol`, measured against the codes' own scale (random-weight
    networks give codes near 1e-9, where a fixed atol would pass anything)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0, "all-zero codes compare nothing"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def invoke(*args):
    """Run the CLI in-process as a user would type it (arguments made strings)."""
    from click.testing import CliRunner
    from pipeline.cli import cli
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result):
    """The CLI's error line of a failed command; asserts it failed with one line and no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


def image_folder(root, colors, per_split=(("train", 6), ("val", 3), ("test", 3)), size=lambda i: (32, 24)):
    """An ImageFolder with its own split folders: per split, `n` images per class of `colors`
    ({class: RGB}); `size(i)` gives the i-th image's size."""
    for split, n in per_split:
        for name, color in colors.items():
            for i in range(n):
                write_image(root / split / name / f"{i}.png", size=size(i), color=color)
    return root


def textured(size, seed):
    """A photo-like RGB image: smooth structure at several scales plus sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    image = np.zeros((h, w, 3))
    for cells, weight in ((4, 90.0), (16, 50.0), (64, 25.0)):
        coarse = Image.fromarray(rng.integers(0, 256, (cells, cells * w // h, 3), dtype=np.uint8))
        image += weight * np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.float64) / 255.0
    image += rng.normal(0, 4, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_jpeg(path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    textured(size, seed).save(path, quality=90)
    return path


def ok(*args):
    """Run the CLI, assert it succeeded, return its output."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output
