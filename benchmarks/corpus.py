"""The photo corpus the stage-one benches run on: vehicles JPEGs re-encoded at photo sizes.

    root = make_corpus("../shared", "bench/corpus", 384)   # bench/corpus/vehicles-photos-384/{train,val,test}/<class>/
    big = repeat_corpus(root, 10)                          # the same files 10 times over, under other names

Made once from ../shared's vehicles images and kept (git-ignored) while its recipe file
matches: half the images 500x375, half 1024x768 (web and phone-photo sizes), upscaled
with mild sensor-like noise so that they carry real detail, quality 90.
"""
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

SIZES = ((500, 375), (1024, 768))  # every other image: a mix of web and phone-photo sizes
QUALITY = 90
NOISE = 3.0                        # grey levels of sensor-like noise, so upscaled JPEGs carry real detail
CLASSES = {"0": "not_emergency", "1": "emergency"}
RECIPE = "corpus.json"


def make_corpus(shared, corpus_dir, n):
    """n photo-sized JPEGs from the vehicles images as corpus_dir/vehicles-photos-N/{train,val,test}/<class>/;
    made once, reused while its recipe file matches."""
    root = Path(corpus_dir) / f"vehicles-photos-{n}"
    recipe = {"source": "vehicles", "images": n, "sizes": [list(s) for s in SIZES], "quality": QUALITY,
              "noise": NOISE, "version": 1}
    if _has_recipe(root, recipe):
        return root
    source = Path(shared) / "data" / "vehicles"
    if not (source / "emergency_train.csv").is_file():
        raise PipelineError(f"{source}: no vehicles data to make the bench corpus from; pass --shared PATH")
    with open(source / "emergency_train.csv", newline="") as f:
        rows = [row for row in csv.reader(f)][1:]
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        name, label = rows[k % len(rows)]
        split = {5: "test", 6: "val"}.get(k % 7, "train")  # every split gets images, even for n = 7
        path = root / split / CLASSES[label] / f"{k:05d}-{Path(name).stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source / "images" / name) as img:
            photo(img.convert("RGB"), SIZES[k % 2], rng).save(path, quality=QUALITY)
    (root / RECIPE).write_text(json.dumps(recipe))
    return root


def photo(img, size, rng):
    """Crop to the aspect of `size`, upscale (bicubic), add mild noise: like a camera image of that size."""
    w, h = img.size
    crop_h = min(h, round(w * size[1] / size[0]))
    crop_w = min(w, round(crop_h * size[0] / size[1]))
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    big = np.asarray(img.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC), dtype=np.float32)
    big += rng.normal(0.0, NOISE, big.shape).astype(np.float32)  # [H, W, 3]
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def repeat_corpus(root, times):
    """The same files `times` over under distinct names (hard links, copies across devices): the long run's set."""
    big = root.with_name(f"{root.name}-x{times}")
    recipe = {"of": root.name, "times": times, "source": json.loads((root / RECIPE).read_text())}
    if _has_recipe(big, recipe):
        return big
    shutil.rmtree(big, ignore_errors=True)
    for path in sorted(root.rglob("*.jpg")):
        for c in range(times):
            target = big / path.parent.relative_to(root) / f"c{c}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    (big / RECIPE).write_text(json.dumps(recipe))
    return big


def _has_recipe(root, recipe):
    try:
        return json.loads((root / RECIPE).read_text()) == recipe
    except (OSError, ValueError):
        return False
