"""Predict: classify image files with a saved head and the backbone it was trained on.

    predict_files("features/vehicles/heads/<cache>.avgpool.svm.h5", ["photos/"], "predictions.csv")

The head file carries its cache's provenance (model, weights and their sha256,
layer, pooling, precision), so the same codes are computed for new images.
"""
import csv
from pathlib import Path

import numpy as np

from .backbones import load_backbone
from .datasets import IMAGE_EXTENSIONS, ImageTable
from .errors import DataError, WeightsError
from .extract import default_batch_size, default_workers, iter_codes, resolve_device
from .heads import LinearHead


def list_images(inputs):
    """Files as given, folders searched recursively for images; sorted, no duplicates."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"{item}: no such file or folder; give image files or folders of images")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return list(dict.fromkeys(found))


def backbone_for(head, weights=None):
    """Rebuild the backbone the head's codes came from; refuse other weights."""
    info = head.provenance
    if weights is None:
        weights = {"file": info.get("weights_source"), "random": "none"}.get(info["weights"], "default")
    backbone = load_backbone(info["model"], weights)
    expected = info.get("weights_sha256") or info["weights"]
    actual = backbone.weights_sha256 or backbone.weights
    if expected != actual and not (backbone.weights == info["weights"] and not backbone.weights_sha256):
        raise WeightsError(f"weights {weights} ({actual[:12]}) are not those the head was trained on "
                           f"({expected[:12]}); pass the original weights with --weights")
    return backbone


def predict_files(head_file, inputs, out, weights=None, device="auto", batch_size=None):
    """Write `path,label,score,skipped` for every image -> (images classified, images skipped)."""
    head = LinearHead(head_file)
    paths = list_images(inputs)
    backbone = backbone_for(head, weights)
    table = ImageTable("predict", "files", Path("."), [str(p) for p in paths], np.zeros(len(paths), dtype=np.int64),
                       head.class_names, np.array(["test"] * len(paths)), "none", "")
    [layer] = backbone.resolve([head.layer])
    device = resolve_device(device)
    batches = iter_codes(table, backbone, [layer], np.arange(len(paths)), device,
                         head.provenance.get("precision", "fp32"), batch_size or default_batch_size(device),
                         min(default_workers(), len(paths) // 16))
    codes, failures = zip(*batches) if len(paths) else ((), ())
    X = np.concatenate([c[layer.name] for c in codes])  # [N, D]
    failures = [reason for batch in failures for reason in batch]
    pred, score = head.predict_with_scores(X)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score", "skipped"])
        for path, k, s, reason in zip(paths, pred, score, failures):
            if reason:  # undecodable: no label, and why
                writer.writerow([str(path), "", "", reason])
            else:
                writer.writerow([str(path), head.class_names[k], f"{s:.6f}", ""])
    skipped = sum(1 for reason in failures if reason)
    return len(paths) - skipped, skipped
