"""Stage one: run a frozen backbone over a data set once and cache its codes in HDF5.

    table = load_dataset("vehicles", "data")
    backbone = load_backbone("mobilenet_v2", "weights.pth")
    result = extract_features(table, backbone, ["penultimate"], "features")

One loop: a DataLoader decodes and transforms images (large JPEGs at reduced DCT
scale), in worker processes while a GPU computes or, on CPU, by one thread per core
between forward passes; the backbone runs every requested layer in one forward pass
(eval, inference_mode, BatchNorm folded, channels_last, bf16/fp16 autocast where the
hardware runs it natively), and each batch of pooled codes goes to the cache's
partial folder by a writer thread while the next batch runs. Memory does not grow
with the data set; a killed run resumes after its last whole batch; an image that
cannot be decoded is skipped with its reason. The cache is keyed by everything that
changes its values; the same request finds it and does nothing, another model
setting rebuilds it, changed data stops with what changed (`update` brings it up to
date). `python -m pipeline.bench` measures the loop against the forward pass alone.
"""
import collections
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
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .backbones import Extractor, pool, weights_tag
from .checks import data_checks, summary
from .images import DRAFT_FACTOR
from .errors import ImageDecodeError, PipelineError, StaleCacheError
from .store import (CacheWriter, FeatureCache, Reuse, extraction_lock, read_cache_settings, read_partial_settings,
                    remove_partial)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PREFETCH_BATCHES = 4  # per worker
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass
class ExtractResult:
    path: Path
    status: str          # "hit" (cache already there), "extracted", "resumed", "updated"
    layers: list         # layer names in the cache
    rows: int            # rows computed by this call
    seconds: float
    images_per_s: float
    message: str         # one line for the user


class ImageRows(Dataset):
    """Rows `rows` of an ImageTable as (normalised tensor [3, H, W], row index, sha256 of the file,
    why it could not be decoded or "").

    An image that cannot be decoded runs as zeros and is dropped from the cache with its reason:
    one bad file never stops a run or moves a label. `draft`: the size the transform resizes to;
    large JPEGs then decode at reduced scale (see datasets.draft_decode), never below it.
    `threads`: how many decode a batch at once.
    """

    def __init__(self, table, transform, rows, draft=None, threads=1):
        self.table, self.transform, self.rows, self.draft, self.threads = table, transform, rows, draft, threads
        self._blank = None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        i = int(self.rows[k])
        try:
            image, digest = self.table.load(i, draft=self.draft)
        except ImageDecodeError as e:
            return self.blank(), i, "", str(e) or "cannot decode"
        return self.transform(image), i, digest, ""

    def blank(self):
        """Zeros shaped like the transform's output: what an undecodable image runs as."""
        if self._blank is None:
            self._blank = torch.zeros_like(self.transform(Image.new("RGB", (8, 8))))
        return self._blank

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
                     batch_size=None, num_workers=None, progress=True, jpeg_draft=True, update=False, rebuild=False):
    """Cache the codes of `layer_specs` for every image of `table`; see module docstring.

    `jpeg_draft`: decode JPEGs much larger than the model needs at reduced scale (faster; codes
    within cosine 0.99 of full decoding). It is part of the cache key. When the data set changed
    since the cache was made, StaleCacheError says what changed, unless `update` (compute only new
    and changed images, copy the rest, drop removed ones) or `rebuild` (start over).
    """
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    path = cache_path(features_dir, table.name, backbone)
    settings = cache_settings(table, backbone, precision, jpeg_draft)
    with extraction_lock(path):
        plan = plan_extraction(path, table, backbone, backbone.resolve(layer_specs), settings, update, rebuild)
        if plan.todo is None:
            return ExtractResult(path, "hit", plan.settings["layers"], 0, 0.0, 0.0, plan.note)
        writer = _resume_writer(path, plan)
        start = writer.n_done if writer else 0
        status = "resumed" if start else "updated" if len(plan.reuse.rows) else "extracted"
        batch_size = batch_size or default_batch_size(device)
        num_workers = default_workers(device) if num_workers is None else num_workers
        t0 = time.perf_counter()
        # worker processes (the GPU default) start decoding before the model is traced and the file made
        batches = iter(image_loader(table, backbone.transform, plan.todo[start:], device, batch_size,
                                    num_workers, jpeg_draft))
        model = backbone.extractor(plan.layers)
        writer = writer or _create_writer(path, table, backbone, model, plan,
                                          _penultimate_name(backbone, layer_specs, plan.layers))
        _run(model, batches, writer, device, precision, progress, f"{backbone.name} {table.name}")
        seconds = time.perf_counter() - t0
        rows = len(plan.todo) - start
        rate = rows / seconds if seconds > 0 else 0.0
        writer.finish({"device": device_description(device), "batch_size": batch_size,
                       "num_workers": num_workers, "images_per_s": round(rate, 2),
                       "seconds": round(seconds, 2), "created": datetime.now(timezone.utc).isoformat()})
    with FeatureCache(path) as cache:
        found = summary(data_checks(cache))
    checks = f"\nnote: {found} (`make report` lists them)" if found else ""
    message = (f"{plan.note}{status} {rows} images -> {path} ({', '.join(plan.settings['layers'])}; "
               f"{precision} on {device.type}, {rate:.1f} images/s){checks}")
    return ExtractResult(path, status, plan.settings["layers"], rows, seconds, rate, message)


@dataclass
class Plan:
    """What one extract call does: which rows it computes (None: nothing, the cache is there)."""
    layers: list
    settings: dict       # the cache key, with "layers"
    todo: np.ndarray     # table rows to compute, in order
    reuse: Reuse         # rows copied from the cache being updated
    split: np.ndarray    # the split to record per row
    note: str = ""


DATA_KEYS = ("dataset_fingerprint", "split_source", "duplicates")  # what --update can bring up to date


def plan_extraction(path, table, backbone, layers, settings, update=False, rebuild=False):
    """Compare the request with the cache at `path` -> Plan: a hit, a fresh run, or an update."""
    def fresh(layers, note=""):
        return Plan(layers, {**settings, "layers": [layer.name for layer in layers]},
                    np.arange(len(table)), Reuse.none(), np.asarray(table.split), note)

    existing = None if rebuild or not path.exists() else read_cache_settings(path)
    if existing is None:
        return fresh(layers, f"rebuilding {path}; " if rebuild and path.exists() else "")
    changed = _differences(existing, settings)
    have = list(existing.get("layers", []))
    more = [layer.name for layer in layers if layer.name not in have]
    if not changed and not more:
        if read_partial_settings(path) == existing:
            remove_partial(path)  # left by a run killed between its last rename and its clean-up
        return Plan(layers, existing, None, Reuse.none(), None, f"{path}: cache found with these settings; nothing to do")
    union = backbone.resolve(have + more)
    if not changed:
        return fresh(union, f"adding layers to {path} (it had {', '.join(have)}); ")
    if not set(changed) <= set(DATA_KEYS):
        return fresh(layers, f"{path} was made with other {', '.join(changed)}; rebuilding it (the old file stays until done); ")
    with FeatureCache(path) as old:
        change = DataChange.between(old, table)
        if not update:
            raise StaleCacheError(
                f"{path}: the data set changed since this cache was made ({change}); run again with --update "
                "(make extract UPDATE=1) to extract only new and changed images and keep the rest, "
                "or --rebuild (REBUILD=1) to start over")
        if more:
            return fresh(union, f"{change}; more layers asked for, so rebuilding {path}; ")
        split = np.asarray(table.split).copy()
        split[change.kept_rows] = old.split[change.kept_from]  # old images keep their split: no leak into test
        return Plan(union, {**settings, "layers": have}, np.setdiff1d(np.arange(len(table)), change.kept_rows),
                    Reuse.from_cache(old, change.kept_rows, change.kept_from), split, f"updating {path}: {change}; ")


@dataclass
class DataChange:
    """How a data set differs from the one a cache was made from, row by row (ids and stamps)."""
    new: list
    removed: list
    changed: list
    relabelled: list
    retried: list           # skipped last time (unreadable ...), tried again
    kept_rows: np.ndarray   # table rows whose codes stay valid ...
    kept_from: np.ndarray   # ... and their rows in the cache

    @classmethod
    def between(cls, cache, table):
        index = {id_: k for k, id_ in enumerate(cache.ids)}
        stamps, skipped = cache.stamps, {id_ for id_, _ in cache.skipped}
        new, changed, relabelled, retried, kept_rows, kept_from = [], [], [], [], [], []
        for row, id_ in enumerate(table.ids):
            k = index.get(id_)
            if k is None:
                (retried if id_ in skipped else new).append(id_)
            elif stamps[k] != table.stamps[row]:
                changed.append(id_)
            else:
                kept_rows.append(row)
                kept_from.append(k)
                if cache.class_names[cache.labels[k]] != table.class_names[table.labels[row]]:
                    relabelled.append(id_)
        listed = set(table.ids)
        removed = [id_ for id_ in cache.ids if id_ not in listed]
        return cls(new, removed, changed, relabelled, retried, np.array(kept_rows, dtype=np.int64),
                   np.array(kept_from, dtype=np.int64))

    def __str__(self):
        parts = [f"{len(ids)} {what} (first: {ids[0]})" for what, ids in
                 (("new", self.new), ("removed", self.removed), ("changed", self.changed),
                  ("relabelled", self.relabelled), ("skipped before, to retry", self.retried)) if ids]
        return ", ".join(parts) or "the same images, other listing rules (skipped rows or splits)"


def cache_settings(table, backbone, precision, jpeg_draft=True):
    """Everything that changes the cached values: the cache key (layers are added later)."""
    return {"dataset": table.name, "layout": table.layout, "dataset_fingerprint": table.fingerprint,
            "split_source": table.split_source, "model": backbone.name, "weights": backbone.weights,
            "weights_sha256": backbone.weights_sha256, "transform": _describe(backbone.transform),
            "precision": precision, "decode": decode_setting(backbone.transform, jpeg_draft),
            "duplicates": "dropped" if table.drop_duplicates else "kept"}


def decode_setting(transform, jpeg_draft):
    """How images are decoded, as recorded in the cache key; draft decoding changes pixels slightly."""
    return f"jpeg-draft-{DRAFT_FACTOR}x" if jpeg_draft and draft_size(transform) else "full"


def draft_size(transform):
    """The shorter side the transform resizes to (torchvision's ImageClassification), or None."""
    size = getattr(transform, "resize_size", None)
    return int(size[0]) if isinstance(size, (list, tuple)) and len(size) == 1 else None


_UNRECORDED = {"decode": "full", "duplicates": "kept"}  # caches made before a key was recorded: what they did


def _differences(old, new):
    return [key for key in new if key != "layers" and old.get(key, _UNRECORDED.get(key)) != new[key]]


def _describe(transform):
    return " ".join(repr(transform).split())


def _resume_writer(path, plan):
    """A writer continuing the interrupted run of this very plan, or None (start a new one)."""
    if read_partial_settings(path) != plan.settings:
        return None
    writer = CacheWriter.resume(path)
    if writer.reuse_source != plan.reuse.source or not np.array_equal(writer.todo, plan.todo):
        return None
    return writer


def _penultimate_name(backbone, layer_specs, layers):
    """The cache name of the penultimate layer; without resolving it again (~0.5 s) when it is all that was asked."""
    if list(layer_specs) == ["penultimate"] and len(layers) == 1:
        return layers[0].name
    return backbone.resolve(["penultimate"])[0].name


def _create_writer(path, table, backbone, model, plan, penultimate):
    """A new partial cache; shapes and dims come from one dry run of the extractor."""
    layers, settings = plan.layers, plan.settings
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
    return CacheWriter.create(path, ids=table.ids, labels=table.labels, split=plan.split, stamps=table.stamps,
                              class_names=table.class_names, layer_dims=layer_dims, attrs=attrs,
                              todo=plan.todo, reuse=plan.reuse, skipped=table.skipped)


def library_versions():
    return {"pipeline": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "scikit-learn": metadata.version("scikit-learn")}  # not imported: 2 s of start-up here


def image_loader(table, transform, rows, device, batch_size, num_workers, jpeg_draft=True):
    """Batches (images [B, 3, H, W] float32, row indices [B], sha256 [B], failures [B]) of `rows`
    (see ImageRows): decoded in `num_workers`
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
    """Yield ({layer name: codes [B, D] float32}, failures [B]) for `rows` of `table`, in order;
    failures[i] says why image i could not be decoded ("" if it was; its codes are meaningless).

    Images are decoded and transformed as image_loader says; one forward pass
    gives every layer.
    """
    loader = image_loader(table, backbone.transform, rows, device, batch_size, num_workers, jpeg_draft)
    info = collections.deque()
    for codes in forward_codes(backbone.extractor(layers), _images_only(loader, info), device, precision):
        yield codes, info.popleft()[1]


def _images_only(loader, info):
    """(images, rows) of each batch for forward_codes; its (sha256, failures) go to the deque `info`,
    to be taken in order as the codes come out."""
    for images, rows, digests, failures in loader:
        info.append((list(digests), list(failures)))
        yield images, rows


def prepare_model(model, device):
    """The extractor as the loop runs it: BatchNorm folded into convolutions, on `device`,
    channels_last (on CPU, memory kept for reuse)."""
    if device.type == "cpu":
        keep_freed_memory()
    if isinstance(model, Extractor):
        model.fold_batchnorm()
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
    for images, *_ in batches:
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


def _run(model, batches, writer, device, precision, progress, desc):
    """Stream codes into the cache; the disk write of one batch overlaps the next forward pass."""
    bar = tqdm(total=len(writer.todo), initial=writer.n_done, unit="img", disable=not progress, desc=desc,
               dynamic_ncols=True)
    info = collections.deque()
    pending = None
    with ThreadPoolExecutor(max_workers=1) as disk:
        for codes in forward_codes(model, _images_only(batches, info), device, precision):
            digests, failures = info.popleft()
            if pending is not None:
                pending.result()  # at most one batch waits for the disk; write errors surface here
            pending = disk.submit(writer.append, codes, digests, failures)
            bar.update(len(digests))
        if pending is not None:
            pending.result()
    bar.close()
