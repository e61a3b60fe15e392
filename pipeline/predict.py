"""Predict: classify image files with a saved head and the backbone it was trained on.

    predict_files("features/vehicles/heads/<cache>.avgpool.svm.h5", ["photos/"], "predictions.csv")

The head file carries its cache's provenance (model, weights and their sha256,
layer, pooling, precision, decoding), so new images get the codes the cache would
have given them: the same engine as extract (this process, or a Ray cluster), over
`ImageFiles`.
"""
import csv
import warnings
from pathlib import Path

import numpy as np

from .backbones import load_backbone
from .errors import PipelineError, PipelineWarning, WeightsError
from .extract import open_engine
from .hardware import collector_skips_existing
from .heads import LinearHead
from .layouts import NOT_UTF8, escaped_name
from .plan import draft_size
from .sources import ImageFiles, list_images

FILES_PER_WORKER = 16  # fewer files than this per decode process: not worth starting one


def backbone_for(head, weights=None):
    """Rebuild the backbone the head's codes came from; refuse other weights."""
    info = head.provenance
    if weights is None:
        weights = {"file": info.get("weights_source"), "random": "none"}.get(info["weights"], "default")
        if info["weights"] == "file" and not Path(weights or "").is_file():
            raise WeightsError(f"the head was trained on codes of weights file {weights}, which is not there; "
                               "pass WEIGHTS=<its new path> (make predict) or --weights <its new path>")
    backbone = load_backbone(info["model"], weights)
    expected = info.get("weights_sha256") or info["weights"]
    actual = backbone.weights_sha256 or backbone.weights
    if expected != actual and not (backbone.weights == info["weights"] and not backbone.weights_sha256):
        raise WeightsError(f"weights {weights} ({actual[:12]}) are not those the head was trained on "
                           f"({expected[:12]}); pass the original weights with --weights")
    if info.get("model_args", "") != backbone.model_args:  # a cache made before weights.PRETRAINED_ARGS
        raise WeightsError(f"the head was trained on codes of {info['model']} built with "
                           f"{info.get('model_args') or 'no arguments'}, and these weights now build it with "
                           f"{backbone.model_args}; extract its cache again (make extract) and train the head again")
    return backbone


@collector_skips_existing()  # as extract: no full collection while the model is traced
def codes_of_files(head, files, weights=None, device="auto", batch_size=None, engine="local", compiled=False,
                   **ray_options):
    """Codes of the head's layer for every file, as its cache made them -> (X [N, D], failures [N]).
    `engine`: "local" on `device` (`compiled`: through torch.compile), or "ray" (`ray_options`:
    ray_address, ray_data; see extract.open_engine)."""
    backbone = backbone_for(head, weights)
    [layer] = backbone.resolve([head.layer])
    info = head.provenance
    decode = "device" if info.get("decode") == "device" else "cpu"  # decoded as its cache was
    runner = open_engine(engine, device, decode=decode, transform=backbone.transform, compiled=compiled,
                         **ray_options)
    if engine == "local":
        runner.num_workers = min(runner.num_workers, len(files) // FILES_PER_WORKER)
    draft = draft_size(backbone.transform) if info.get("decode", "full").startswith("jpeg-draft") else None
    X, failures = np.zeros((len(files), layer.dim), dtype=np.float32), [""] * len(files)
    for batch, codes in runner.codes(files, backbone, [layer], np.arange(len(files)), info.get("precision", "fp32"),
                                     batch_size or runner.default_batch_size(), draft):
        X[batch.rows] = codes[layer.name]
        for row, reason in zip(batch.rows, batch.failures):
            failures[row] = reason
    return X, failures


def predict_files(head_file, inputs, out, weights=None, device="auto", batch_size=None, engine="local",
                  compiled=False, **ray_options):
    """Write `path,label,score,skipped` for every image -> (images classified, images skipped).
    The score is the winner's probability, or for an svm head its margin over the runner-up.
    A file whose name is not UTF-8 is skipped, not classified: the CSV (UTF-8) shows its name's bytes escaped."""
    head = LinearHead(head_file)
    if head.provenance.get("weights") == "random":
        warnings.warn(f"{head_file}: trained on codes of {head.provenance.get('model')} with random weights "
                      "(WEIGHTS=none): its labels test the pipeline and classify nothing; train it on codes of "
                      "pretrained weights", PipelineWarning, stacklevel=2)
    listed = list_images(inputs)
    escaped = [escaped_name(str(path)) for path in listed]  # None: a UTF-8 name, classified
    files = ImageFiles([path for path, shown in zip(listed, escaped) if shown is None])
    out, partial = Path(out), _writable(Path(out))
    try:
        X, failures = (codes_of_files(head, files, weights, device, batch_size, engine, compiled, **ray_options)
                       if len(files) else (np.zeros((0, head.n_features_in_), dtype=np.float32), []))
        score = head.predict_proba(X).max(axis=1) if hasattr(head, "predict_proba") else head.margin(X)
        classified = iter(zip(head.predict(X), score, failures))
        with open(partial, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "score", "skipped"])
            for path, shown in zip(map(str, listed), escaped):
                label, s, reason = next(classified) if shown is None else (None, None, NOT_UTF8)
                writer.writerow([shown or path, "", "", reason] if reason else [path, label, f"{s:.6f}", ""])
        partial.replace(out)  # whole, or the file that was there stays
    finally:
        partial.unlink(missing_ok=True)
    skipped = sum(1 for reason in failures if reason) + len(listed) - len(files)
    return len(listed) - skipped, skipped


def _writable(out):
    """The file the predictions are written to before they take `out`'s name, made (empty) before any work:
    an `out` that cannot be written is said before the images are classified, not after."""
    if out.is_dir():
        raise PipelineError(f"OUT={out} is a folder; give a file to write, e.g. OUT={out / 'predictions.csv'}")
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.touch()
    except OSError as e:
        raise PipelineError(f"cannot write {out} ({e.strerror}); give OUT= a file in a folder you can write") from None
    return partial
