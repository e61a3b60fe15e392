"""Stage one: run a frozen backbone over a data set once and cache its codes in HDF5.

    table = load_dataset("vehicles", "data")
    backbone = load_backbone("mobilenet_v2", "weights.pth")
    result = extract_features(table, backbone, ["penultimate"], "features")

One loop: a DataLoader decodes and transforms images (large JPEGs at reduced DCT
scale), in worker processes while a GPU computes or, on CPU, by one thread per core
between forward passes; the backbone runs every requested layer in one forward pass
(eval, inference_mode, channels_last, bf16/fp16 autocast where the hardware runs it
natively), and each batch of pooled codes is appended to the cache by a writer
thread while the next batch runs. Memory does not grow with the data set. The cache
is keyed by everything that changes its values; the same request finds it and does
nothing, any other request never reuses it. `python -m pipeline.bench` measures the
loop against the forward pass alone.
"""
import ctypes
import functools
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .backbones import pool, weights_tag
from .datasets import DRAFT_FACTOR
from .errors import PipelineError
from .store import CacheWriter, partial_path, read_cache_settings

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PREFETCH_BATCHES = 4  # per worker
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


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
    """Rows `rows` of an ImageTable as (normalised tensor [3, H, W], row index).

    `draft`: the size the transform resizes to; large JPEGs then decode at reduced scale
    (see datasets.draft_decode), never below it. `threads`: how many decode a batch at once.
    """

    def __init__(self, table, transform, rows, draft=None, threads=1):
        self.table, self.transform, self.rows, self.draft, self.threads = table, transform, rows, draft, threads

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        i = int(self.rows[k])
        return self.transform(self.table.load_image(i, draft=self.draft)), i

    def __getitems__(self, ks):
        """One batch (the DataLoader asks for batches this way); PIL and torch release the GIL."""
        if self.threads <= 1:
            return [self[k] for k in ks]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(self.__getitem__, ks))


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
    """auto: bf16 where the hardware runs it natively (AVX512-BF16 or AMX CPUs, Ampere+ GPUs), fp16 on
    older GPUs, else fp32.

    mkldnn's own bf16 check also passes on AVX-512 CPUs without bf16 instructions (Ice Lake,
    Cascade Lake), where oneDNN emulates bf16 and runs slower than fp32 (see pipeline/bench.py).
    """
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_cpu_bf16() else "fp32"


def native_cpu_bf16():
    """Whether this CPU has bf16 instructions (not oneDNN's emulation on plain AVX-512)."""
    has = lambda check: getattr(torch.cpu, check, lambda: False)()  # torch.cpu private checks
    return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and (has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported")))


def default_batch_size(device):
    """256 fills a GPU; on CPU 16, 32 and 64 run alike (resnet50 fp32 on the 2-core bench machine:
    18.6, 18.3, 19.2 img/s, within its noise), and 32 keeps activations moderate."""
    return 256 if device.type == "cuda" else 32


def default_workers(device=None):
    """Decoding processes: on a GPU cores (at most 8), decoding while it computes; on CPU none.

    On CPU the forward pass's threads already fill every core, and a decoder beside them stalls
    the whole pass (a preempted thread holds the others up at each barrier), so batches are
    decoded between forward passes by one thread per core (image_loader). Measured on the 2-core
    bench machine (noisy, shared), resnet50 fp32 over 192 photo-sized JPEGs, loader rate / forward-only
    rate, in one process, 5 interleaved runs each: threads between passes median 0.94 (0.80-1.02),
    1 process 0.81, 2 processes 0.78; an earlier series (medians of 3-4): 2 processes 0.84, 1 process
    0.85, the same at nice 10 0.80 and 0.79, at nice 19 0.80, one thread between passes 0.88.
    torch.set_num_threads(1) for the forward costs a third of its speed (resnet18: 26 vs 38 img/s);
    set_num_interop_threads does not apply (eager inference does not use that pool).
    """
    if device is not None and device.type == "cpu":
        return 0
    return min(8, os.cpu_count() or 1)


def device_description(device):
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def extract_features(table, backbone, layer_specs, features_dir, *, device="auto", precision="auto",
                     batch_size=None, num_workers=None, progress=True, jpeg_draft=True):
    """Cache the codes of `layer_specs` for every image of `table`; see module docstring.

    `jpeg_draft`: decode JPEGs much larger than the model needs at reduced scale (faster; codes
    within cosine 0.99 of full decoding). It is part of the cache key.
    """
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    path = cache_path(features_dir, table.name, backbone)
    layers = backbone.resolve(layer_specs)
    settings = cache_settings(table, backbone, precision, jpeg_draft)

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

    writer = _resume_writer(path, settings)
    start = writer.n_done if writer else 0
    status = "resumed" if start else "extracted"
    batch_size = batch_size or default_batch_size(device)
    num_workers = default_workers(device) if num_workers is None else num_workers
    t0 = time.perf_counter()
    try:
        # worker processes (the GPU default) start decoding before the model is traced and the file made
        batches = iter(image_loader(table, backbone.transform, np.arange(start, len(table)), device, batch_size,
                                    num_workers, jpeg_draft))
        model = backbone.extractor(layers)
        writer = writer or _create_writer(path, table, backbone, model, layers, settings,
                                          _penultimate_name(backbone, layer_specs, layers))
        _run(model, batches, writer, device, precision, progress, f"{backbone.name} {table.name}", len(table))
        seconds = time.perf_counter() - t0
        rows = len(table) - start
        rate = rows / seconds if seconds > 0 else 0.0
        writer.finish({"device": device_description(device), "batch_size": batch_size,
                       "num_workers": num_workers, "images_per_s": round(rate, 2),
                       "seconds": round(seconds, 2), "created": datetime.now(timezone.utc).isoformat()})
    finally:
        if writer is not None:
            writer.close()
    message = (f"{note}{status} {rows} images -> {path} ({', '.join(settings['layers'])}; "
               f"{precision} on {device.type}, {rate:.1f} images/s)")
    return ExtractResult(path, status, settings["layers"], rows, seconds, rate, message)


def cache_settings(table, backbone, precision, jpeg_draft=True):
    """Everything that changes the cached values: the cache key (layers are added later)."""
    return {"dataset": table.name, "layout": table.layout, "dataset_fingerprint": table.fingerprint,
            "split_source": table.split_source, "model": backbone.name, "weights": backbone.weights,
            "weights_sha256": backbone.weights_sha256, "transform": _describe(backbone.transform),
            "precision": precision, "decode": decode_setting(backbone.transform, jpeg_draft)}


def decode_setting(transform, jpeg_draft):
    """How images are decoded, as recorded in the cache key; draft decoding changes pixels slightly."""
    return f"jpeg-draft-{DRAFT_FACTOR}x" if jpeg_draft and draft_size(transform) else "full"


def draft_size(transform):
    """The shorter side the transform resizes to (torchvision's ImageClassification), or None."""
    size = getattr(transform, "resize_size", None)
    return int(size[0]) if isinstance(size, (list, tuple)) and len(size) == 1 else None


_UNRECORDED = {"decode": "full"}  # caches made before a key was recorded: what they did


def _differences(old, new):
    return [key for key in new if key != "layers" and old.get(key, _UNRECORDED.get(key)) != new[key]]


def _describe(transform):
    return " ".join(repr(transform).split())


def _resume_writer(path, settings):
    """A writer continuing the matching partial file, or None (start a new one)."""
    partial = partial_path(path)
    if partial.exists() and read_cache_settings(partial) == settings:
        return CacheWriter.resume(path)
    return None


def _penultimate_name(backbone, layer_specs, layers):
    """The cache name of the penultimate layer; without resolving it again (~0.5 s) when it is all that was asked."""
    if list(layer_specs) == ["penultimate"] and len(layers) == 1:
        return layers[0].name
    return backbone.resolve(["penultimate"])[0].name


def _create_writer(path, table, backbone, model, layers, settings, penultimate):
    """A new partial file; shapes and dims come from one dry run of the extractor."""
    with torch.inference_mode():
        maps = model.body(torch.zeros(1, 3, backbone.input_size, backbone.input_size))  # {node: [1, ...]}
    layer_dims = {layer.name: (pool(maps[layer.node], layer.pooling).shape[1],
                               {"tap": layer.tap, "node": layer.node, "pooling": layer.pooling,
                                "depth": layer.depth, "raw_shape": list(maps[layer.node].shape[1:])})
                  for layer in layers}
    attrs = {**{k: v for k, v in settings.items() if k != "layers"},
             "settings": settings, "pooling": {layer.name: layer.pooling for layer in layers},
             "penultimate": penultimate,
             "weights_source": backbone.weights_source, "dataset_root": str(Path(table.root).resolve())
             if table.layout != "digits" else str(table.root), "versions": library_versions()}
    return CacheWriter.create(path, ids=table.ids, labels=table.labels, split=table.split,
                              class_names=table.class_names, layer_dims=layer_dims, attrs=attrs)


def library_versions():
    return {"pipeline": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "scikit-learn": metadata.version("scikit-learn")}  # not imported: 2 s of start-up here


def image_loader(table, transform, rows, device, batch_size, num_workers, jpeg_draft=True):
    """Batches (images [B, 3, H, W] float32, row indices [B]) of `rows`: decoded in `num_workers`
    processes while the model runs, or with none by one thread per core when the next batch is
    asked for (see default_workers); in pinned memory on a GPU so the copy overlaps compute."""
    draft = draft_size(transform) if jpeg_draft else None
    threads = 1 if num_workers else os.cpu_count() or 1
    return DataLoader(ImageRows(table, transform, rows, draft, threads), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      prefetch_factor=PREFETCH_BATCHES if num_workers else None)


def autocast_for(device, precision):
    """The autocast context running a model at `precision` (disabled for fp32)."""
    return torch.autocast(device.type, dtype=_DTYPES.get(precision, torch.float32), enabled=precision in _DTYPES)


def iter_codes(table, backbone, layers, rows, device, precision, batch_size, num_workers, jpeg_draft=True):
    """Yield {layer name: codes [B, D] float32} for `rows` of `table`, in order.

    Images are decoded and transformed as image_loader says; one forward pass
    gives every layer.
    """
    loader = image_loader(table, backbone.transform, rows, device, batch_size, num_workers, jpeg_draft)
    yield from forward_codes(backbone.extractor(layers), loader, device, precision)


def prepare_model(model, device):
    """The extractor as the loop runs it: on `device`, channels_last (on CPU, memory kept for reuse)."""
    if device.type == "cpu":
        keep_freed_memory()
    return model.to(device, memory_format=torch.channels_last)


@functools.cache
def keep_freed_memory():
    """Have glibc keep large freed blocks for reuse rather than hand them back to the OS.

    Blocks above glibc's mmap threshold (at most 32 MiB unless set) are mapped afresh at every
    allocation and unmapped at every free, so each forward pass page-faults its activations in
    again. Measured on the 2-core bench machine, resnet50 fp32 batch 32: 26% of CPU time in the
    kernel, 12 img/s; with this 0%, 18.3 img/s. Peak memory is unchanged, but the process keeps
    its peak until it exits. A no-op where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False


def forward_codes(model, batches, device, precision):
    """Yield {layer name: codes [B, D] float32 numpy} for each (images, rows) of `batches`, in order.

    Nothing waits on a GPU per batch: the codes of batch k are copied to pinned host memory
    without blocking, batch k+1 is queued behind them, and only then is batch k waited for.
    """
    model = prepare_model(model, device)
    pending = None
    for images, _ in batches:
        with torch.inference_mode(), autocast_for(device, precision):
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)  # [B, 3, H, W]
            codes = _copy_to_host(model(images))
        if pending is not None:
            yield _wait(pending)
        pending = codes
    if pending is not None:
        yield _wait(pending)


def _copy_to_host(outputs):
    """Start moving {name: [B, D]} to host float32 -> (host tensors, event to wait on, or None on CPU)."""
    host = {name: v.float().to("cpu", non_blocking=True) for name, v in outputs.items()}  # pinned from a GPU
    device = next(iter(outputs.values())).device
    if device.type != "cuda":
        return host, None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))  # the stream the copies were queued on
    return host, event


def _wait(pending):
    host, event = pending
    if event is not None:
        event.synchronize()
    return {name: v.numpy() for name, v in host.items()}


def _run(model, batches, writer, device, precision, progress, desc, total):
    """Stream codes into the cache; the disk write of one batch overlaps the next forward pass."""
    bar = tqdm(total=total, initial=writer.n_done, unit="img", disable=not progress, desc=desc, dynamic_ncols=True)
    pending = None
    with ThreadPoolExecutor(max_workers=1) as disk:
        for codes in forward_codes(model, batches, device, precision):
            if pending is not None:
                pending.result()  # at most one batch waits for the disk; write errors surface here
            pending = disk.submit(writer.append, codes)
            bar.update(len(next(iter(codes.values()))))
        if pending is not None:
            pending.result()
    bar.close()
