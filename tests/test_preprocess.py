"""preprocess.py: the fast recipe gives torchvision's pixels (within PIL's rounding) and codes."""
import numpy as np
import pytest
import torch
from torchvision.models import ResNet50_Weights, EfficientNet_B0_Weights
import torchvision.transforms.functional as F

from conftest import textured
from pipeline.backbones import load_backbone
from pipeline.plan import cache_key
from pipeline.preprocess import FastClassification, Normalize, fast_preprocessing

REFERENCE = ResNet50_Weights.IMAGENET1K_V1.transforms()
GREY_LEVEL = 1 / 255 / min(REFERENCE.std)  # one grey level, in normalised units


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 300), (1024, 768), (257, 999), (120, 90), (224, 224)])
def test_one_resize_of_the_crop_box_gives_torchvisions_pixels(size):
    image = textured(size, seed=sum(size))
    fast = fast_preprocessing(REFERENCE)
    pixels = fast(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    difference = (fast.normalizer()(pixels[None])[0] - REFERENCE(image)).abs()
    assert difference.max() <= 1.01 * GREY_LEVEL  # PIL's fixed-point rounding: at most one grey level
    assert difference.mean() <= 0.05 * GREY_LEVEL


def test_normalize_is_torchvisions_and_leaves_float_images_alone():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    normalize = Normalize(REFERENCE.mean, REFERENCE.std)
    expected = F.normalize(F.convert_image_dtype(images, torch.float), REFERENCE.mean, REFERENCE.std)
    torch.testing.assert_close(normalize(images), expected, rtol=1e-5, atol=1e-5)
    floats = torch.randn(2, 3, 8, 8)
    assert normalize(floats) is floats


def test_normalize_keeps_the_batchs_layout_and_the_values_the_caches_were_made_with():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    normalize = Normalize(REFERENCE.mean, REFERENCE.std)
    normalised = normalize(images)
    assert normalised.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalised, (images.float() - normalize.shift) * normalize.scale)  # bit for bit: same codes


def test_other_recipes_are_kept_as_they_are():
    bicubic = EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
    assert fast_preprocessing(bicubic) is bicubic
    assert fast_preprocessing(F.to_tensor) is F.to_tensor


def test_codes_of_the_fast_recipe_are_torchvisions():
    images = [textured(size, seed=k) for k, size in enumerate([(500, 375), (640, 480), (300, 400), (256, 256)])]
    codes = {}
    for preprocessing in ("reference", "fast"):
        backbone = load_backbone("resnet18", "none", preprocessing=preprocessing)
        [layer] = backbone.resolve(["penultimate"])
        with torch.inference_mode():
            batch = torch.stack([backbone.transform(image) for image in images])
            codes[preprocessing] = backbone.extractor([layer])(batch)[layer.name].numpy()
    a, b = codes["reference"], codes["fast"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.9999


def test_the_fast_recipe_is_part_of_the_cache_key():
    from types import SimpleNamespace
    table = SimpleNamespace(name="t", layout="imagefolder", fingerprint="f", split_source="folders",
                            drop_duplicates=False)
    keys = {p: cache_key(table, load_backbone("resnet18", "none", preprocessing=p), "fp32")["transform"]
            for p in ("reference", "fast")}
    assert keys["reference"] != keys["fast"] and "FastClassification" in keys["fast"]
    assert isinstance(load_backbone("resnet18", "none").transform, FastClassification)
