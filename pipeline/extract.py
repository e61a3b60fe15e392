"""Stage one: run a frozen backbone over a data set once and cache its codes in HDF5.

    table = load_dataset("vehicles", "data")
    backbone = load_backbone("mobilenet_v2", "weights.pth")
    result = extract_features(table, backbone, ["penultimate"], "features")

One loop: a DataLoader decodes and transforms images in worker processes, the
backbone runs every requested layer in one forward pass (eval, inference_mode,
channels_last, bf16/fp16 autocast where the hardware has it), and each batch of
pooled codes is appended to the cache by a writer thread while the next batch
runs. Memory does not grow with the data set. The cache is keyed by everything
that changes its values; the same request finds it and does nothing, any other
request never reuses it.
"""
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import sklearn
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .backbones import weights_tag
from .errors import PipelineError
from .store import CacheWriter, partial_path, read_cache_settings

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractResult:
    path: Path
    status: str          # "hit" (cache already there), "extracted", "resumed"
    layers: list         # layer names in the cache
    rows: int            # rows computed by this call
    seconds: float
    images_per_s: float
    message: str         # one line for the user


class ImageRows(Dataset):
    """Rows `rows` of an ImageTable as (normalised tensor [3, H, W], row index)."""

    def __init__(self, table, transform, rows):
        self.table, self.transform, self.rows = table, transform, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        i = int(self.rows[k])
        return self.transform(self.table.load_image(i)), i


def cache_path(features_dir, dataset, backbone):
    return Path(features_dir) / dataset / f"{backbone.name}-{backbone.weights_tag}.h5"


def find_cache(features_dir, dataset, model=None, weights=None):
    """The cache to train on -> (path, note). Without model/weights: the only or newest one."""
    folder = Path(features_dir) / dataset
    if model and weights:
        path = folder / f"{model}-{weights_tag(model, weights)}.h5"
        return path, ""
    pattern = f"{model}-*.h5" if model else "*.h5"
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        partial = sorted(folder.glob(pattern + ".partial"))
        if partial:  # let the cache reader explain how to resume
            return partial[0].with_suffix(""), ""
        what = f"model {model}" if model else "any model"
        raise PipelineError(f"no feature cache for {dataset} and {what} in {folder}; "
                            f"run `make extract DATASET={dataset}{' MODEL=' + model if model else ''}` first")
    note = f"using {found[-1]}" + (f" (newest of {len(found)}; pass MODEL= and WEIGHTS= to choose)" if len(found) > 1 else "")
    return found[-1], note


def resolve_device(device="auto"):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise PipelineError(f"unknown DEVICE {device!r} ({e}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"DEVICE={device} asked for but torch sees no CUDA GPU; use DEVICE=cpu or auto")
    return device


def resolve_precision(precision, device):
    """auto: bf16 where the hardware runs it natively (recent CPUs, Ampere+ GPUs), fp16 on older GPUs."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def default_batch_size(device):
    return 256 if device.type == "cuda" else 32


def default_workers():
    return min(8, os.cpu_count() or 1)


def device_description(device):
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def extract_features(table, backbone, layer_specs, features_dir, *, device="auto", precision="auto",
                     batch_size=None, num_workers=None, progress=True):
    """Cache the codes of `layer_specs` for every image of `table`; see module docstring."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    path = cache_path(features_dir, table.name, backbone)
    layers = backbone.resolve(layer_specs)
    settings = cache_settings(table, backbone, precision)

    existing = read_cache_settings(path) if path.exists() else None
    note = ""
    if existing is not None:
        changed = _differences(existing, settings)
        have = set(existing.get("layers", []))
        if not changed and {layer.name for layer in layers} <= have:
            return ExtractResult(path, "hit", sorted(have), 0, 0.0, 0.0,
                                 f"{path}: cache found with these settings; nothing to do")
        if not changed:  # same data and model, more layers: redo once with all of them
            layers = backbone.resolve(list(existing["layers"]) + [layer.name for layer in layers])
            note = f"adding layers to {path} (it had {', '.join(sorted(have))}); "
        else:
            note = f"{path} was made with other {', '.join(changed)}; rebuilding it (the old file stays until done); "
    settings["layers"] = [layer.name for layer in layers]

    writer = _open_writer(path, table, backbone, layers, settings, precision)
    start = writer.n_done
    status = "resumed" if start else "extracted"
    batch_size = batch_size or default_batch_size(device)
    num_workers = default_workers() if num_workers is None else num_workers
    t0 = time.perf_counter()
    try:
        _run(table, backbone, layers, writer, device, precision, batch_size, num_workers, progress)
        seconds = time.perf_counter() - t0
        rows = len(table) - start
        rate = rows / seconds if seconds > 0 else 0.0
        writer.finish({"device": device_description(device), "batch_size": batch_size,
                       "num_workers": num_workers, "images_per_s": round(rate, 2),
                       "seconds": round(seconds, 2), "created": datetime.now(timezone.utc).isoformat()})
    finally:
        writer.close()
    message = (f"{note}{status} {rows} images -> {path} ({', '.join(settings['layers'])}; "
               f"{precision} on {device.type}, {rate:.1f} images/s)")
    return ExtractResult(path, status, settings["layers"], rows, seconds, rate, message)


def cache_settings(table, backbone, precision):
    """Everything that changes the cached values: the cache key (layers are added later)."""
    return {"dataset": table.name, "layout": table.layout, "dataset_fingerprint": table.fingerprint,
            "split_source": table.split_source, "model": backbone.name, "weights": backbone.weights,
            "weights_sha256": backbone.weights_sha256, "transform": _describe(backbone.transform),
            "precision": precision}


def _differences(old, new):
    return [key for key in new if key != "layers" and old.get(key) != new[key]]


def _describe(transform):
    return " ".join(repr(transform).split())


def _open_writer(path, table, backbone, layers, settings, precision):
    """Resume a matching partial file, else start a new one."""
    partial = partial_path(path)
    if partial.exists() and read_cache_settings(partial) == settings:
        return CacheWriter.resume(path)
    shapes = backbone.output_shapes([layer.node for layer in layers])
    extractor = backbone.extractor(layers)
    with torch.inference_mode():
        dims = {name: v.shape[1] for name, v in extractor(torch.zeros(1, 3, backbone.input_size, backbone.input_size)).items()}
    layer_dims = {layer.name: (dims[layer.name], {"tap": layer.tap, "node": layer.node, "pooling": layer.pooling,
                                                  "depth": layer.depth, "raw_shape": list(shapes[layer.node][1:])})
                  for layer in layers}
    attrs = {**{k: v for k, v in settings.items() if k != "layers"},
             "settings": settings, "pooling": {layer.name: layer.pooling for layer in layers},
             "penultimate": backbone.resolve(["penultimate"])[0].name,
             "weights_source": backbone.weights_source, "dataset_root": str(Path(table.root).resolve())
             if table.layout != "digits" else str(table.root), "versions": library_versions()}
    return CacheWriter.create(path, ids=table.ids, labels=table.labels, split=table.split,
                              class_names=table.class_names, layer_dims=layer_dims, attrs=attrs)


def library_versions():
    return {"pipeline": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "scikit-learn": sklearn.__version__}


def iter_codes(table, backbone, layers, rows, device, precision, batch_size, num_workers):
    """Yield {layer name: codes [B, D] float32} for `rows` of `table`, in order.

    Images are decoded and transformed in `num_workers` processes while the
    backbone runs; one forward pass gives every layer.
    """
    loader = DataLoader(ImageRows(table, backbone.transform, rows), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if num_workers else None)
    model = backbone.extractor(layers).to(device, memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=_DTYPES.get(precision, torch.float32), enabled=precision in _DTYPES)
    with torch.inference_mode(), autocast:
        for images, _ in loader:
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)  # [B, 3, H, W]
            yield {name: v.float().cpu().numpy() for name, v in model(images).items()}


def _run(table, backbone, layers, writer, device, precision, batch_size, num_workers, progress):
    """Stream codes into the cache; the disk write of one batch overlaps the next forward pass."""
    rows = np.arange(writer.n_done, len(table))
    bar = tqdm(total=len(table), initial=writer.n_done, unit="img", disable=not progress,
               desc=f"{backbone.name} {table.name}", dynamic_ncols=True)
    pending = None
    with ThreadPoolExecutor(max_workers=1) as disk:
        for codes in iter_codes(table, backbone, layers, rows, device, precision, batch_size, num_workers):
            if pending is not None:
                pending.result()  # at most one batch waits for the disk; write errors surface here
            pending = disk.submit(writer.append, codes)
            bar.update(len(next(iter(codes.values()))))
        if pending is not None:
            pending.result()
    bar.close()
