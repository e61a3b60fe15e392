"""The fast paths of stage one: JPEG draft decoding (what it changes, that it is in the cache
key, that codes stay close to full decoding), the one-batch-late GPU overlap on the CPU path,
and precision auto. No timing is asserted here; pipeline/bench.py measures."""
import csv

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from pipeline.backbones import load_backbone
from pipeline.bench import cosine, photo
from pipeline.datasets import ImageTable, load_dataset
from pipeline.images import draft_decode
from pipeline.extract import extract_features, forward_codes, resolve_precision
from pipeline.store import FeatureCache


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


@pytest.fixture
def photos(tmp_path):
    """An ImageFolder of 1024x768 JPEGs with its own splits: 2 per class in each."""
    root = tmp_path / "data" / "photos"
    for s, split in enumerate(("train", "val", "test")):
        for k, name in enumerate(("a", "b")):
            for i in range(2):
                write_jpeg(root / split / name / f"{i}.jpg", (1024, 768), seed=100 * s + 10 * k + i)
    return root


def run(root, backbone, **options):
    options = {"precision": "fp32", "batch_size": 4, "num_workers": 0, "progress": False, **options}
    return extract_features(load_dataset(root.name, root.parent), backbone, ["penultimate"],
                            root.parent.parent / "features", **options)


def codes(result):
    with FeatureCache(result.path) as cache:
        return cache.features(cache.attrs["penultimate"])[0]


@pytest.fixture(scope="module")
def random_mobilenet():
    return load_backbone("mobilenet_v2", "none")


# ---------------------------------------------------------------------------
# Draft decoding


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


def test_draft_leaves_other_formats_alone(tmp_path):
    path = write_image(tmp_path / "big.png", size=(1024, 768))
    with Image.open(path) as img:
        assert draft_decode(img, 256) == 1
        assert img.size == (1024, 768)


def test_small_images_decode_exactly_as_without_draft(tmp_path):
    root = tmp_path / "small"
    write_jpeg(root / "a" / "vehicle.jpg", (224, 224))
    write_jpeg(root / "a" / "web.jpg", (500, 375), seed=1)
    write_image(root / "b" / "digit.png", size=(28, 28))
    textured((400, 400), 2).convert("L").save(root / "b" / "grey.jpg")
    ids = ["a/vehicle.jpg", "a/web.jpg", "b/digit.png", "b/grey.jpg"]
    table = ImageTable("small", "imagefolder", root, ids, np.zeros(4, dtype=np.int64), ["a"], np.array(["train"] * 4),
                       "given", "")
    for i in range(len(table)):
        assert np.array_equal(np.asarray(table.load_image(i, draft=256)), np.asarray(table.load_image(i)))


def assert_close_codes(full, draft):
    """cosine > 0.99, and draft moves codes far less than going to another image does (random
    weights put any two images above 0.99)."""
    similarity = cosine(full, draft)
    other = cosine(full, np.roll(full, 1, axis=0))  # each image against the next one
    assert similarity.min() > 0.99
    assert (1 - similarity).max() < 0.1 * (1 - other).min()


def test_draft_codes_stay_close_to_full_decoding(photos, random_mobilenet):
    full = codes(run(photos, random_mobilenet, jpeg_draft=False))
    draft = codes(run(photos, random_mobilenet, jpeg_draft=True))
    assert_close_codes(full, draft)


def test_draft_codes_stay_close_on_real_photos_with_real_weights(shared, mobilenet_weights, tmp_path):
    """Vehicles JPEGs made photo-sized as the bench does, codes of the pretrained MobileNetV2."""
    source = shared / "data" / "vehicles"
    rows = list(csv.reader(open(source / "emergency_train.csv")))[1:]
    root = tmp_path / "data" / "real"
    rng = np.random.default_rng(0)
    for k, (name, label) in enumerate(rows[:12]):
        folder = root / ("train", "val", "test")[k % 3] / label
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(source / "images" / name) as img:
            photo(img.convert("RGB"), (1024, 768), rng).save(folder / name, quality=90)
    backbone = load_backbone("mobilenet_v2", str(mobilenet_weights))
    full = codes(run(root, backbone, jpeg_draft=False))
    draft = codes(run(root, backbone, jpeg_draft=True))
    assert_close_codes(full, draft)  # measured: cosine 0.997-0.998; other images 0.84-0.90


def test_draft_is_part_of_the_cache_key(photos, random_mobilenet):
    draft = run(photos, random_mobilenet, jpeg_draft=True)
    with h5py.File(draft.path, "r") as h5:
        assert h5.attrs["decode"] == "jpeg-draft-2x"
    full = run(photos, random_mobilenet, jpeg_draft=False)
    assert full.status == "extracted" and "decode" in full.message  # the draft cache is not reused
    assert run(photos, random_mobilenet, jpeg_draft=False).status == "hit"
    again = run(photos, random_mobilenet, jpeg_draft=True)
    assert again.status == "extracted" and "decode" in again.message  # nor the full one for draft


def test_caches_from_before_the_decode_key_count_as_full_decoding(photos, random_mobilenet):
    import json
    result = run(photos, random_mobilenet, jpeg_draft=False)
    with h5py.File(result.path, "r+") as h5:  # as written before `decode` was recorded
        settings = json.loads(h5.attrs["settings"])
        del settings["decode"]
        h5.attrs["settings"] = json.dumps(settings)
    assert run(photos, random_mobilenet, jpeg_draft=False).status == "hit"
    assert run(photos, random_mobilenet, jpeg_draft=True).status == "extracted"


# ---------------------------------------------------------------------------
# The forward loop and precision


class MeanColour(torch.nn.Module):
    def forward(self, images):
        return {"mean": images.mean(dim=(2, 3))}  # [B, 3]


def test_forward_codes_yields_every_batch_in_order():
    batches = [(torch.full((n, 3, 4, 4), float(k)), None) for k, n in enumerate((3, 5, 2))]
    out = list(forward_codes(MeanColour(), batches, torch.device("cpu"), "fp32"))
    assert [len(o["mean"]) for o in out] == [3, 5, 2]
    assert [float(o["mean"][0, 0]) for o in out] == [0.0, 1.0, 2.0]
    assert all(o["mean"].dtype == np.float32 for o in out)
    assert list(forward_codes(MeanColour(), [], torch.device("cpu"), "fp32")) == []


def test_forward_codes_leaves_no_autocast_or_inference_mode_behind():
    batches = [(torch.ones(2, 3, 4, 4), None), (torch.ones(2, 3, 4, 4), None)]
    for _ in forward_codes(MeanColour(), batches, torch.device("cpu"), "bf16"):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    if native and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no mkldnn bf16 on this CPU at all")
    assert resolve_precision("auto", torch.device("cpu")) == expected
