"""Stage one on a Ray cluster: the same (Batch, codes) stream as codes.iter_codes, computed by Ray Data.

    engine = RayEngine("auto", data="shared")        # address None: RAY_ADDRESS, else a local Ray
    precision = engine.precision("auto")              # resolved where the backbone will run
    for batch, codes in engine.codes(table, backbone, layers, rows, precision, batch_size=32, draft=256):
        ...                                           # in the order of `rows`, as codes.iter_codes yields them

The driver keeps every decision: the listing, the cache key, the plan and the
crash-safe writer (extract.py). Ray Data does the work: an actor pool runs the
backbone, one actor per GPU (`num_gpus=1`), fed by CPU tasks on any node that read
and decode the images; on a cluster without GPUs, one actor per node decodes and
runs its own batches. The images are read where they are: at a path every node
reads (`data="shared"`), or by tasks pinned to the driver's node that ship the
bytes (`data="driver"`). The codes come back
to the driver in the order of `rows` (`preserve_order`), so the writer appends
them exactly as on one machine: every row once, a killed driver resumes after its
last whole batch. Ray restarts a killed actor and retries a lost task.
"""
import logging
import os
import warnings

import numpy as np
import torch

from .codes import SourceRows, forward, prepare_model, stack_images
from .errors import ImageDecodeError, PipelineError, PipelineWarning
from .hardware import default_batch_size, describe_device, resolve_precision
from .images import load_bytes, read_image_bytes
from .sources import Batch

__all__ = ["RayEngine", "DATA_PLACES", "connect", "ray_codes"]

DATA_PLACES = ("shared", "driver")
QUIET = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}  # Ray's loggers, and the least
# level they print at on the driver


def _ray():
    try:
        import ray
    except ImportError:
        raise PipelineError("--engine ray needs Ray: pip install -e '.[ray]' (make extract ENGINE=ray installs it)") from None
    return ray


def connect(address=None):
    """Join the Ray cluster at `address` ("auto", "host:port"; None: RAY_ADDRESS, else a local Ray)."""
    ray = _ray()
    if not ray.is_initialized():
        cluster = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=cluster, log_to_driver=False, logging_level=logging.WARNING,
                 **({} if cluster else {"include_dashboard": False}))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the writer takes rows in the order of the listing
    context.enable_progress_bars = False             # the driver's own bar counts written rows
    for name, level in QUIET.items():  # after ray.data's import, which sets its loggers up; the driver's
        logging.getLogger(name).setLevel(level)  # own bar and message say what Ray's INFO lines say
    return ray


class RayEngine:
    """Stage one's codes computed on a Ray cluster (see the module docstring)."""
    num_workers = 0  # no decoding processes of the driver's own: the cluster decodes

    def __init__(self, address=None, data="shared"):
        if data not in DATA_PLACES:
            raise PipelineError(f"unknown data place {data!r}; use one of {', '.join(DATA_PLACES)}")
        self.ray, self.data = connect(address), data
        self.gpus = int(self.ray.cluster_resources().get("GPU", 0))
        self.device = torch.device("cuda" if self.gpus else "cpu")  # where the actors run: keys batch size
        self._where = None

    def precision(self, precision):
        """`precision` resolved ("auto") where the backbone runs, or as given (with the warning of a CPU
        that would emulate it). On a cluster without GPUs, where every node with a CPU runs an actor,
        this very process answers when its node is one of them; else a task on a GPU (or CPU) of the
        cluster does (about 2 s: its process imports torch), and its warnings are the driver's."""
        if self.gpus:
            here = precision != "auto"  # as given: a GPU runs any precision natively
        else:
            here = self.ray.get_runtime_context().get_node_id() in _cpu_nodes(self.ray)  # its CPU runs an actor
        if here:
            return resolve_precision(precision, self.device)
        task = self.ray.remote(num_gpus=1 if self.gpus else 0, num_cpus=0 if self.gpus else 1)(_resolve_on_worker)
        resolved, self._where, said = self.ray.get(task.remote(precision))
        for message in said:
            warnings.warn(message, PipelineWarning, stacklevel=2)
        return resolved

    def default_batch_size(self):
        return default_batch_size(self.device)

    def describe(self):
        nodes = sum(1 for node in self.ray.nodes() if node["Alive"])
        return f"ray: {nodes} node(s), {self.gpus} GPU(s); actors on {self._where or ('GPUs' if self.gpus else 'CPUs')}"

    def codes(self, source, backbone, layers, rows, precision, batch_size, draft=None):
        return ray_codes(source, backbone.extractor(layers), backbone.transform, rows, precision=precision,
                         batch_size=batch_size, draft=draft, data=self.data, gpus=self.gpus)


def _cpu_nodes(ray):
    """Ids of the live nodes with a CPU: where the actors of a cluster without GPUs run, one each."""
    return [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1]


def _resolve_on_worker(precision):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)  # as the actors set it, so that the description is theirs
    with warnings.catch_warnings(record=True) as said:  # for the driver to show: a worker's go to its log
        warnings.simplefilter("always", PipelineWarning)
        resolved = resolve_precision(precision, device)
    return resolved, describe_device(device), [str(w.message) for w in said if w.category is PipelineWarning]


def ray_codes(source, extractor, transform, rows, *, precision, batch_size, draft=None, data="shared", gpus=0):
    """Yield (Batch, {layer name: codes [B, D] float32}) for `rows` of `source`, in order, computed on the
    cluster joined by `connect` (with `gpus` GPUs). The codes of a row whose failure is not "" are
    meaningless (as iter_codes)."""
    ray = _ray()
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    blocks = -(-len(rows) // batch_size)  # a block per batch: the first codes come back after one batch
    dataset = ray.data.from_numpy(rows).repartition(blocks)  # column "data": the rows
    source_ref, model_ref = ray.put(source), ray.put(extractor)
    if data == "driver":  # read where the files are: tasks on the driver's own node
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        dataset = dataset.map_batches(_read_bytes, fn_args=(source_ref,), batch_size=batch_size, batch_format="numpy",
                                      label_selector=here)
    if gpus:  # decoding in tasks of their own, spread over every node's CPUs (Ray Data's default strategy)
        # while the GPUs compute; an empty label selector of their own (any node) keeps them from inheriting
        # the reading tasks' node label, and so from being fused into them
        dataset = dataset.map_batches(_decode, fn_args=(source_ref, transform, draft), batch_size=batch_size,
                                      batch_format="numpy", num_cpus=1, label_selector={})
    actors = gpus or len(_cpu_nodes(ray))
    decode = None if gpus else (source_ref, transform, draft)
    dataset = dataset.map_batches(_Codes, fn_constructor_args=(model_ref, precision, decode), batch_size=batch_size,
                                  batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
                                  num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    for out in dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        names = [key for key in out if key.startswith("layer/")]
        yield (Batch(out["data"].astype(np.int64), None, [str(s) for s in out["sha256"]],
                     [str(f) for f in out["failure"]]),
               {name[len("layer/"):]: out[name] for name in names})


def _read_bytes(batch, source):
    """On the driver's node: each row's file bytes (b"" with the reason when it cannot be read)."""
    source, data, failures = _resolved(source), [], []
    for row in batch["data"]:
        path = source.file(int(row))
        try:
            data.append(read_image_bytes(path) if path is not None else b"")
            failures.append("")
        except ImageDecodeError as e:
            data.append(b"")
            failures.append(str(e) or "cannot read")
    return {"data": batch["data"], "bytes": np.array(data, dtype=object), "read_failure": np.array(failures)}


def _resolved(source):
    """The source itself (shipped once to the object store; fn_args are passed to map tasks as given)."""
    import ray
    return ray.get(source) if isinstance(source, ray.ObjectRef) else source


class _Shipped:
    """The rows of one batch whose bytes the driver's node read (_read_bytes), as an image source indexed
    by position in the batch; a row whose pixels are in the source loads from it."""

    def __init__(self, batch, source):
        self.batch, self.source = batch, source

    def load(self, k, draft=None):
        row = int(self.batch["data"][k])
        if self.source.file(row) is None:
            return self.source.load(row, draft)
        if self.batch["read_failure"][k]:
            raise ImageDecodeError(str(self.batch["read_failure"][k]))
        return load_bytes(bytes(self.batch["bytes"][k]), draft)


def _decode(batch, source, transform, draft, threads=1):
    """Rows (and their bytes, when shipped) -> pixels [B, H, W, 3], sha256, failure, by codes.SourceRows
    with `threads` threads. The pixels are the batch's channels_last memory as a plain array: Ray's blocks
    keep that as it is, where a strided [B, 3, H, W] view would be transposed into a contiguous copy."""
    source = _resolved(source)
    positions = np.arange(len(batch["data"]))
    items = (SourceRows(_Shipped(batch, source), transform, positions, draft, threads) if "bytes" in batch
             else SourceRows(source, transform, batch["data"], draft, threads))
    _, images, digests, failures = zip(*items.__getitems__(positions))
    return {"data": batch["data"].astype(np.int64), "image": stack_images(images).permute(0, 2, 3, 1).numpy(),
            "sha256": np.array(digests), "failure": np.array(failures)}


class _Codes:
    """Actor: the backbone, prepared once, on the actor's GPU (when Ray gave it one) or its CPU. On a
    cluster without GPUs it also decodes its batches, with every core of its node in turn with the forward
    pass, as the local engine does: decoding tasks beside it would share the cores with the forward pass's
    threads and slow both (README: the Ray engine's bench)."""

    def __init__(self, extractor, precision, decode=None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.threads = os.cpu_count() or 1
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)  # Ray sets one thread per CPU asked for (one)
        self.model = prepare_model(_resolved(extractor), self.device, precision=precision)
        self.precision, self.decode = precision, decode

    def __call__(self, batch):
        if self.decode is not None:
            batch = _decode(batch, *self.decode, threads=self.threads)
        pixels = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)  # [B, 3, H, W] view, channels_last
        images = Batch(batch["data"], pixels, list(batch["sha256"]), list(batch["failure"]))
        [(done, codes)] = list(forward(self.model, [images], self.device, self.precision))
        return {"data": done.rows, "sha256": batch["sha256"], "failure": batch["failure"],
                **{f"layer/{name}": values for name, values in codes.items()}}
