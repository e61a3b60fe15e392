"""Stage one: run a frozen backbone over a data set once and cache its codes in HDF5.

    table = load_dataset("vehicles", "data")
    backbone = load_backbone("mobilenet_v2", "weights.pth")
    result = extract_features(table, backbone, ["penultimate"], "features")

One call: resolve the device and precision (hardware.py), key the cache and plan the
work against what is on disk (plan.py), then stream (batch, codes) pairs (codes.py, or
ray_engine.py on a Ray cluster) into the cache's crash-safe partial folder (store), one
batch file each, written by a thread while the next batch runs. Memory does not grow
with the data set; a killed run resumes after its last whole batch; an image that
cannot be decoded is skipped with its reason. `benchmarks/stage_one.py` measures the
loop against the forward pass alone.
"""
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from . import __version__
from .checks import data_checks, note
from .codes import check_compiler, iter_codes
from .device_decode import check_device_decoding
from .datasets import training_problem
from .errors import PipelineError, PipelineWarning
from .hardware import (collector_skips_existing, cpu_has_amx, default_batch_size, default_workers, describe_device,
                       resolve_device, resolve_precision)
from .paths import cache_path
from .plan import cache_key, draft_size, plan_extraction
from .store import (H5PY_VERSION, FeatureCache, PartialCache, extraction_lock, partial_path, read_cache_settings,
                    read_partial_settings)
from .weights import weights_tag

__all__ = ["ENGINES", "ExtractResult", "LocalEngine", "check_engine_options", "duplicates_rule", "extract_features",
           "library_versions", "open_engine"]


def duplicates_rule(features_dir, dataset, model, weights, drop_duplicates=None):
    """Whether to leave duplicates out: as asked (True/False), else as the cache of (dataset, model,
    weights) was made (a new cache keeps them). A cache made with them dropped stays so without the
    option given again; a change of rule is an update (plan.py)."""
    if drop_duplicates is not None:
        return drop_duplicates
    try:
        path = cache_path(features_dir, dataset, model, weights_tag(model, weights))
    except (PipelineError, ValueError, KeyError):  # no such model or file: load_backbone says so, in one line
        return False
    settings = read_cache_settings(path) if path.exists() else None
    return (settings or {}).get("duplicates") == "dropped"


@dataclass
class ExtractResult:
    path: Path
    status: str          # "hit" (cache already there), "extracted", "resumed", "updated"
    layers: list         # layer names in the cache
    rows: int            # rows computed by this call
    seconds: float
    images_per_s: float
    message: str         # one line for the user
    waited_s: float = 0.0  # of `seconds`, how long the model waited for decoded images (0: not measured)


@collector_skips_existing()  # a full collection while the model is traced: README, bench
def extract_features(table, backbone, layer_specs, features_dir, *, device="auto", precision="auto",
                     batch_size=None, num_workers=None, progress=True, jpeg_draft=True, update=False, rebuild=False,
                     engine="local", ray_address=None, ray_data="shared", decode="cpu", compiled=False):
    """Cache the codes of `layer_specs` for every image of `table`; see module docstring.

    `jpeg_draft`: decode JPEGs much larger than the model needs at reduced scale (faster; codes
    within cosine 0.99 of full decoding). It is part of the cache key. When the data set changed
    since the cache was made, StaleCacheError says what changed, unless `update` (compute only new
    and changed images, copy the rest, drop removed ones) or `rebuild` (start over). `engine`:
    "local" (this process, on `device`) or "ray" (the Ray cluster at `ray_address`, reading the
    images where `ray_data` says: ray_engine.py); the cache is the same either way. `decode`: "cpu"
    (PIL in the DataLoader's workers), or "device" (JPEGs decoded where the model runs: device_decode);
    part of the cache key. `compiled`: the model through torch.compile (codes.Compiled; local engine);
    the same codes within rounding, so not part of the key, but recorded with the run.
    """
    problem = training_problem(table.labels, table.split, table.class_names)
    if problem:
        warnings.warn(f"{table.name}: {problem}", PipelineWarning, stacklevel=2)
    runner = open_engine(engine, device, num_workers, ray_address, ray_data, decode, backbone.transform, compiled)
    precision = runner.precision(precision)
    path = cache_path(features_dir, table.name, backbone.name, backbone.weights_tag)
    key = cache_key(table, backbone, precision, jpeg_draft, decode)
    layers = backbone.resolve(layer_specs)  # a bad layer is refused before any file is touched
    with extraction_lock(path):
        plan = plan_extraction(path, table, layers, key, backbone.resolve, update, rebuild)
        if plan.todo is None:
            return ExtractResult(path, "hit", plan.settings["layers"], 0, 0.0, 0.0, plan.note)
        writer = _resume_writer(path, plan)
        start = writer.n_done if writer else 0
        if writer is None and partial_path(path).exists():
            plan.note += "an interrupted run's work was for other data or settings, so it starts over; "
        status = "resumed" if start else "updated" if len(plan.reuse.rows) else "extracted"
        batch_size = batch_size or runner.default_batch_size()
        t0 = time.perf_counter()
        pairs = _finite(runner.codes(table, backbone, plan.layers, plan.todo[start:], precision, batch_size,
                                     draft_size(backbone.transform) if jpeg_draft else None), table, precision)
        writer = writer or _create_writer(path, table, backbone, plan)
        failed, waited = _write_all(pairs, writer, progress, f"{backbone.name} {table.name}")
        seconds = time.perf_counter() - t0
        rows = len(plan.todo) - start
        rate = rows / seconds if seconds > 0 else 0.0
        where = runner.describe()
        writer.finish({"device": where, "engine": engine, "batch_size": batch_size,
                       "num_workers": runner.num_workers, "compiled": compiled, "images_per_s": round(rate, 2),
                       "seconds": round(seconds, 2), "waited_for_decoding_s": round(waited, 2),
                       "created": datetime.now(timezone.utc).isoformat()})
    with FeatureCache(path) as cache:
        found = note(data_checks(cache))
    message = (f"{plan.note}{status} {rows - failed} images -> {path} ({', '.join(plan.settings['layers'])}; "
               f"{precision} on {where}{f', {rate:.1f} images/s' if rows > failed else ''}{_waited(waited, seconds)})"
               f"{found and chr(10) + found}"
               f"{_speed_tip(runner, rows, backbone.transform)}")
    return ExtractResult(path, status, plan.settings["layers"], rows, seconds, rate, message, waited)


ENGINES = ("local", "ray")
DECODERS = ("cpu", "device")


def open_engine(engine, device="auto", num_workers=None, ray_address=None, ray_data="shared", decode="cpu",
                transform=None, compiled=False):
    """The engine that computes the codes: LocalEngine, or ray_engine.RayEngine (Ray imported only then).
    `decode` "device" is checked against `transform` (device_decode.check_device_decoding)."""
    check_engine_options(engine, device, num_workers, decode, compiled)
    if engine == "ray":
        from .ray_engine import RayEngine
        return RayEngine(ray_address, ray_data)
    if engine != "local":
        raise PipelineError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    runner = LocalEngine(device, num_workers, decode, compiled)
    if decode == "device":
        check_device_decoding(transform, runner.device)
    return runner


def check_engine_options(engine, device="auto", num_workers=None, decode="cpu", compiled=False):
    """Refuse the local engine's options given to the Ray one (PipelineError), before anything is loaded."""
    if decode not in DECODERS:
        raise PipelineError(f"unknown decode {decode!r}; use one of {', '.join(DECODERS)}")
    if engine == "ray" and decode == "device":
        raise PipelineError("--decode device is for the local engine: on Ray, CPU tasks of the cluster decode; "
                            "leave it out with --engine ray")
    if engine == "ray" and compiled:
        raise PipelineError("--compile is for the local engine: leave it out with --engine ray")
    if engine == "ray" and (device != "auto" or num_workers is not None):
        given = f"--device {device}" if device != "auto" else f"--workers {num_workers}"
        raise PipelineError(f"{given} is for the local engine: on Ray the model runs on the cluster's GPUs "
                            "(else its CPUs) and the cluster decodes; leave it out with --engine ray")


class LocalEngine:
    """This process on `device`: codes.iter_codes, reading (and with `decode` "cpu", decoding) in
    `num_workers` processes (None: the default); `compiled`: through torch.compile."""

    def __init__(self, device="auto", num_workers=None, decode="cpu", compiled=False):
        self.device, self.decode, self.compiled = resolve_device(device), decode, compiled
        self.num_workers = default_workers(self.device) if num_workers is None else num_workers
        if compiled:
            check_compiler(self.device)

    def precision(self, precision):
        return resolve_precision(precision, self.device)

    def default_batch_size(self):
        return default_batch_size(self.device)

    def describe(self):
        return describe_device(self.device)

    def codes(self, source, backbone, layers, rows, precision, batch_size, draft=None):
        return iter_codes(source, backbone, layers, rows, device=self.device, precision=precision,
                          batch_size=batch_size, num_workers=self.num_workers, draft=draft, decode=self.decode,
                          compiled=self.compiled)


TIP_ROWS = 50_000  # runs this long are told of a faster path (compiling, 6-17 s, pays many times over)


def _speed_tip(runner, rows, transform):
    """A line for long local runs made without the faster path measured on such hardware: on an AMX CPU,
    --compile (the forward pass 1.4-1.6x faster); on a GPU decoding on the CPU, --decode device (1.5x on
    an H200, where CPU decoding set the pace), where this model's recipe and a decoder allow it."""
    if rows < TIP_ROWS or not isinstance(runner, LocalEngine):
        return ""
    if runner.device.type == "cpu" and not runner.compiled and cpu_has_amx():
        return ("\nthis CPU has AMX: on runs this long COMPILE=1 (--compile) ran the forward pass 1.4-1.6x faster "
                "after 6-17 s of compiling, with the same codes within rounding (README: Compiling the model)")
    if runner.device.type == "cuda" and runner.decode == "cpu":
        try:
            check_device_decoding(transform, runner.device)
        except PipelineError:
            return ""
        return ("\non a GPU, decoding on the CPU sets the pace: DECODE=device (--decode device) ran 1.5x faster "
                "on an H200, its memory flat; nvJPEG's pixels differ slightly from PIL's, so it makes a cache "
                "of its own (README: Decoding on the GPU)")
    return ""


def _resume_writer(path, plan):
    """The partial cache of this very plan's interrupted run, or None (start a new one)."""
    if read_partial_settings(path) != plan.settings:
        return None
    writer = PartialCache.resume(path)
    if writer.reuse_source != plan.reuse.source or not np.array_equal(writer.todo, plan.todo):
        return None
    return writer


def _create_writer(path, table, backbone, plan):
    """A new partial cache for the plan: its rows, layer sizes and provenance."""
    settings = plan.settings
    attrs = {**{k: v for k, v in settings.items() if k != "layers"}, "settings": settings,
             "pooling": {layer.name: layer.pooling for layer in plan.layers},
             "penultimate": backbone.penultimate_name(), "weights_source": backbone.weights_source,
             "dataset_root": table.location, "versions": library_versions()}
    return PartialCache.create(path, ids=table.ids, labels=table.labels, split=plan.split, stamps=table.stamps,
                               class_names=table.class_names, attrs=attrs, todo=plan.todo, reuse=plan.reuse,
                               layer_dims={layer.name: (layer.dim, layer.attrs) for layer in plan.layers},
                               skipped=table.skipped)


def library_versions():
    return {"pipeline": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "h5py": H5PY_VERSION, "numpy": np.__version__,
            "scikit-learn": metadata.version("scikit-learn")}  # not imported: 2 s of start-up here


def _finite(pairs, table, precision):
    """(batch, codes) passed on; codes that are NaN or inf (fp16 overflowing, weights holding NaN) are
    refused before they reach the cache, where every head would fail on them."""
    for batch, codes in pairs:
        decoded = np.array([not failure for failure in batch.failures], dtype=bool)  # the rest are dropped
        for name, values in codes.items():
            bad = decoded & ~np.isfinite(values).all(axis=1)
            if bad.any():
                why = ("fp16 overflows on some models: use PRECISION=bf16 or fp32" if precision == "fp16" else
                       "are the weights whole? a file holding NaN gives NaN codes")
                raise PipelineError(f"{table.ids[batch.rows[np.argmax(bad)]]}: its {name} codes are NaN or inf "
                                    f"in {precision}; {why}")
        yield batch, codes


def _write_all(pairs, writer, progress, desc):
    """Stream (batch, codes) into the partial cache; the disk write of one batch overlaps the next
    forward pass, and at most one batch waits for the disk (write errors surface here). -> (the number
    of images that could not be decoded (skipped), the seconds the model waited for decoded batches)."""
    bar = tqdm(total=len(writer.todo), initial=writer.n_done, unit="img", disable=not progress, desc=desc,
               dynamic_ncols=True)
    pending, failed, waited = None, 0, 0.0
    with ThreadPoolExecutor(max_workers=1) as disk:
        for batch, codes in pairs:
            failed, waited = failed + sum(map(bool, batch.failures)), waited + batch.waited_s
            if pending is not None:
                pending.result()
            pending = disk.submit(writer.append, batch, codes)
            bar.update(len(batch))
        if pending is not None:
            pending.result()
    bar.close()
    return failed, waited


def _waited(waited, seconds):
    """', the model waited 12% of the time for decoded images': on a CPU, decoding between forward passes;
    elsewhere the decoders falling behind (more workers, or --decode device on a GPU). Nothing if unmeasured."""
    return f", the model waited {waited / seconds:.0%} of the time for decoded images" if waited and seconds else ""
