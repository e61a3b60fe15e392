"""Predict: classify image files with a saved head and the backbone it was trained on.

    predict_files("features/vehicles/heads/<cache>.avgpool.svm.h5", ["photos/"], "predictions.csv")

The head file carries its cache's provenance (model, weights and their sha256,
layer, pooling, precision, decoding), so new images get the codes the cache would
have given them: the same `iter_codes` as extract, over `ImageFiles`.
"""
import csv
from pathlib import Path

import numpy as np

from .backbones import load_backbone
from .codes import iter_codes
from .errors import WeightsError
from .hardware import default_batch_size, default_workers, resolve_device
from .heads import LinearHead
from .plan import draft_size
from .sources import ImageFiles, list_images

FILES_PER_WORKER = 16  # fewer files than this per decode process: not worth starting one


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


def codes_of_files(head, files, weights=None, device="auto", batch_size=None):
    """Codes of the head's layer for every file, as its cache made them -> (X [N, D], failures [N])."""
    backbone = backbone_for(head, weights)
    [layer] = backbone.resolve([head.layer])
    device = resolve_device(device)
    info = head.provenance
    draft = None if info.get("decode", "full") == "full" else draft_size(backbone.transform)
    X, failures = np.zeros((len(files), layer.dim), dtype=np.float32), [""] * len(files)
    for batch, codes in iter_codes(files, backbone, [layer], np.arange(len(files)), device=device,
                                   precision=info.get("precision", "fp32"),
                                   batch_size=batch_size or default_batch_size(device),
                                   num_workers=min(default_workers(device), len(files) // FILES_PER_WORKER),
                                   draft=draft):
        X[batch.rows] = codes[layer.name]
        for row, reason in zip(batch.rows, batch.failures):
            failures[row] = reason
    return X, failures


def predict_files(head_file, inputs, out, weights=None, device="auto", batch_size=None):
    """Write `path,label,score,skipped` for every image -> (images classified, images skipped).
    The score is the winner's probability, or for an svm head its margin over the runner-up."""
    head = LinearHead(head_file)
    files = ImageFiles(list_images(inputs))
    X, failures = codes_of_files(head, files, weights, device, batch_size)
    score = head.predict_proba(X).max(axis=1) if hasattr(head, "predict_proba") else head.margin(X)
    labels = head.predict(X)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score", "skipped"])
        for path, label, s, reason in zip(files.ids, labels, score, failures):
            writer.writerow([path, "", "", reason] if reason else [path, label, f"{s:.6f}", ""])
    skipped = sum(1 for reason in failures if reason)
    return len(files) - skipped, skipped
