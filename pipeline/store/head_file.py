"""Head files: a linear classifier as plain arrays in HDF5, no pickle.

    /coef           float32 [K, D]   (K = 1 for a binary scikit-learn head)
    /intercept      float32 [K]
    /scaler_mean    float64 [D]
    /scaler_scale   float64 [D]      scores = ((x - mean) / scale) @ coef.T + intercept
    attributes      format, head, layer, C, class_names, score, provenance (the cache's attributes)
"""
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from .cache import open_h5, read_attrs, to_attr

HEAD_FORMAT = "pipeline-head/1"
ARRAYS = ("coef", "intercept", "scaler_mean", "scaler_scale")
RETRAIN = "train it again with `make train-head`"


def write_head(path, *, coef, intercept, scaler_mean, scaler_scale, attrs):
    """Save a head under a temporary name, then rename it: a head file is always whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")  # two runs training one head: one file each
    try:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("coef", data=np.asarray(coef, dtype=np.float32))
            h5.create_dataset("intercept", data=np.asarray(intercept, dtype=np.float32))
            h5.create_dataset("scaler_mean", data=np.asarray(scaler_mean, dtype=np.float64))
            h5.create_dataset("scaler_scale", data=np.asarray(scaler_scale, dtype=np.float64))
            h5.attrs["format"] = HEAD_FORMAT
            h5.attrs.update({key: to_attr(value) for key, value in attrs.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_head(path):
    """Load a head file -> (arrays dict, attrs dict); shapes checked to agree."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no such head file; train one with `make train-head`")
    with open_h5(path, remedy=RETRAIN) as h5:
        if h5.attrs.get("format") != HEAD_FORMAT:
            raise CacheError(f"{path}: not a {HEAD_FORMAT} file; train one with `make train-head`")
        try:
            arrays = {key: np.asarray(h5[key][()]) for key in ARRAYS}
        except KeyError as e:
            raise CacheError(f"{path}: head file lacks {e}; {RETRAIN}") from None
        attrs = read_attrs(h5)
    if not all(np.issubdtype(a.dtype, np.number) and np.isfinite(a).all() for a in arrays.values()):
        raise CacheError(f"{path}: head arrays must be finite numbers; {RETRAIN}")
    k, d = arrays["coef"].shape if arrays["coef"].ndim == 2 else (0, 0)
    if (k == 0 or arrays["intercept"].shape != (k,) or arrays["scaler_mean"].shape != (d,)
            or arrays["scaler_scale"].shape != (d,)):
        raise CacheError(f"{path}: head arrays have inconsistent shapes; {RETRAIN}")
    if not (arrays["scaler_scale"] > 0).all():
        raise CacheError(f"{path}: head's scaler_scale holds a value <= 0, which no standardisation has; {RETRAIN}")
    names, layer = attrs.get("class_names"), attrs.get("layer")
    if not isinstance(layer, str) or not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CacheError(f"{path}: head file lacks its layer or class names (attributes `layer`, `class_names`); "
                         f"{RETRAIN}")
    if len(names) != (2 if k == 1 else k):  # one output row is a binary head
        raise CacheError(f"{path}: head has {k} output rows for {len(names)} class names; {RETRAIN}")
    return arrays, attrs
