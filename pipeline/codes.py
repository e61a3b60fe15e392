"""Images to codes: the one generator stage one, predict and the bench all run.

    pairs = iter_codes(source, backbone, layers, rows, device=device, precision="fp32",
                       batch_size=32, num_workers=0, draft=256)
    for batch, codes in pairs:      # batch: a sources.Batch; codes: {layer name: float32 [B, D]}
        ...

A DataLoader decodes and transforms the rows of an image source into `Batch`
records: in worker processes while a GPU computes or, on CPU, by one thread per
core between forward passes (see hardware.default_workers). An image that cannot
be decoded runs as zeros and carries its reason in `batch.failures`. The backbone
runs every requested layer in one forward pass (eval, inference_mode, BatchNorm
folded, channels_last, autocast at the precision; with `compiled`, torch.compile's
inductor fuses it further), and nothing waits on a GPU per batch: the codes of batch
k are copied to host memory while batch k+1 is queued.
"""
import copy
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .backbones import Extractor
from .device_decode import decoded_on, encoded_batches
from .errors import ImageDecodeError, PipelineError
from .hardware import autocast_dtype, autocast_for, keep_freed_memory
from .sources import Batch

__all__ = ["iter_codes", "image_batches", "prepare_model", "forward", "Compiled", "check_compiler"]

PREFETCH_BATCHES = 4  # per worker


class SourceRows(Dataset):
    """Rows `rows` of an image source as (row, image tensor [3, H, W], sha256, failure) items.

    `draft`: the size the transform resizes to, so large JPEGs decode at reduced scale
    (images.draft_decode), or None. `threads`: how many decode one batch at once.
    """

    def __init__(self, source, transform, rows, draft=None, threads=1):
        self.source, self.transform, self.rows, self.draft, self.threads = source, transform, rows, draft, threads
        self._blank, self._pool = None, None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        row = int(self.rows[k])
        try:
            image, digest = self.source.load(row, draft=self.draft)
        except ImageDecodeError as e:
            return row, self.blank(), "", str(e) or "cannot decode"
        return row, self.transform(image), digest, ""

    def blank(self):
        """Zeros shaped like the transform's output: what an undecodable image runs as."""
        if self._blank is None:
            self._blank = torch.zeros_like(self.transform(Image.new("RGB", (8, 8))))
        return self._blank

    def __getitems__(self, ks):
        """One batch (the DataLoader asks for batches this way); PIL and torch release the GIL. The threads
        are kept from one batch to the next: threads made anew for each batch decoded slower (README, bench)."""
        if self.threads <= 1:
            return [self[k] for k in ks]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        return list(self._pool.map(self.__getitem__, ks))

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}  # a copy for a worker process makes threads of its own


def to_batch(items):
    """[(row, image, sha256, failure)] -> one Batch (the DataLoader's collate_fn)."""
    rows, images, digests, failures = zip(*items)
    return Batch(np.array(rows, dtype=np.int64), stack_images(images), list(digests), list(failures))


def stack_images(images):
    """[3, H, W] images -> [B, 3, H, W]: channels_last, the layout the model runs in, when every image is a
    view of HWC pixels (as the fast recipe gives them), so that stacking is one plain copy per image;
    stacking those views to NCHW and converting would transpose every pixel twice."""
    pixels = [image.permute(1, 2, 0) for image in images]  # [H, W, 3] views
    if all(p.is_contiguous() for p in pixels):
        return torch.stack(pixels).permute(0, 3, 1, 2)
    return torch.stack(images)


def image_batches(source, transform, rows, device, batch_size, num_workers, draft=None):
    """A DataLoader of Batch records for `rows` of `source`, in order: decoded in `num_workers`
    processes while the model runs, or with none by one thread per core when the next batch is
    asked for; in pinned memory on a GPU so the copy overlaps compute."""
    threads = 1 if num_workers else os.cpu_count() or 1
    return DataLoader(SourceRows(source, transform, rows, draft, threads), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=to_batch, pin_memory=device.type == "cuda",
                      prefetch_factor=PREFETCH_BATCHES if num_workers else None)


def prepare_model(model, device, compiled_for=None, precision="fp32"):
    """The extractor as the loop runs it: BatchNorm folded into convolutions, on `device`,
    channels_last (on CPU, freed memory kept for reuse), its weights cast once for `precision`
    (cast_weights); with `compiled_for` (a batch size), Compiled for batches of that size."""
    if device.type == "cpu":
        keep_freed_memory()
    if isinstance(model, Extractor):
        model.fold_batchnorm()
    model = cast_weights(model.to(device, memory_format=torch.channels_last), precision)
    return Compiled(model, compiled_for) if compiled_for else model


def cast_weights(model, precision):
    """`model` with the weights and biases of its convolutions and linear layers cast, once, to the dtype
    autocast runs them in at `precision`. Autocast casts them at every call otherwise (it keeps a cast only
    of weights that require grad): resnet50's 25.5M weights, every batch. The values are those it would
    cast them to, so the codes do not change."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return model
    for name, module in list(model.named_modules()):
        if name and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            cast = copy.copy(module)  # a module of its own: the backbone's model, which may share it, keeps fp32
            cast._parameters = {key: None if p is None else nn.Parameter(p.detach().to(dtype), requires_grad=False)
                                for key, p in module._parameters.items()}
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, cast)
    return model


class Compiled(nn.Module):
    """`model` through torch.compile (inductor, its weights frozen into the graph as constants), for
    one batch size: a smaller batch (the last) is padded with blank images and its codes cut back, and
    every batch reaches the graph as a tensor made here (its guards also check how a tensor was made),
    so the graph is compiled once, on the first batch. The codes are the same function as `model`'s;
    the fused kernels round differently (the README gives the cosines)."""

    def __init__(self, model, batch_size):
        super().__init__()
        self.batch_size, self.ready = batch_size, False
        self.compiled = torch.compile(model, options={"freezing": True})

    def forward(self, images):
        count = len(images)
        blank = images.new_zeros((max(self.batch_size - count, 0), *images.shape[1:]))
        images = torch.cat([images, blank]).contiguous(memory_format=torch.channels_last)
        try:
            outputs = self.compiled(images)
        except Exception as e:  # noqa: BLE001 - inductor's errors (no compiler, an unsupported op) vary
            if self.ready:
                raise
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise PipelineError(f"torch.compile failed on the first batch: {reason}; leave --compile out "
                                "(COMPILE=1 out of make), the codes are the same without it") from None
        self.ready = True
        return {name: codes[:count] for name, codes in outputs.items()}


def check_compiler(device):
    """torch.compile on a CPU builds C++: refuse it at once, with the remedy, when no compiler is found."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise PipelineError("--compile on a CPU needs a C++ compiler (g++ or clang++, or CXX naming one) on the "
                            "PATH: install one (apt install g++), or leave --compile out")


def iter_codes(source, backbone, layers, rows, *, device, precision, batch_size, num_workers, draft=None,
               decode="cpu", compiled=False):
    """Yield (Batch, {layer name: codes [B, D] float32 numpy}) for `rows` of `source`, in order.

    Decoding starts at the call (worker processes begin before the model is prepared);
    the codes of a row whose failure is not "" are meaningless and must be dropped.
    `decode`: "cpu" (the workers decode), or "device" (JPEGs decoded where the model runs: device_decode).
    `compiled`: the model through torch.compile (Compiled), compiled on the first batch."""
    if decode == "device":
        batches = decoded_on(device, iter(encoded_batches(source, backbone.transform, rows, batch_size, num_workers)),
                             backbone.transform)
    else:
        batches = iter(image_batches(source, backbone.transform, rows, device, batch_size, num_workers, draft))
    model = prepare_model(backbone.extractor(layers), device, batch_size if compiled else None, precision)
    return forward(model, batches, device, precision)


def forward(model, batches, device, precision):
    """Yield (batch, codes) for each Batch of `batches`; its pixels are released once on the device, and
    its `waited_s` says how long the loop waited for it (decoding it, or for the decoders to hand it over)."""
    pending, batches = None, iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        batch.waited_s = time.perf_counter() - start
        with torch.inference_mode(), autocast_for(device, precision):
            images = batch.images.to(device, non_blocking=True, memory_format=torch.channels_last)  # [B, 3, H, W]
            codes = _copy_to_host(model(images))
        batch.images = None
        if pending is not None:
            yield _wait(*pending)
        pending = batch, codes
    if pending is not None:
        yield _wait(*pending)


def _copy_to_host(outputs):
    """Start moving {name: [B, D]} to host float32 -> (host tensors, event to wait on, or None on CPU)."""
    host = {name: v.float().to("cpu", non_blocking=True) for name, v in outputs.items()}  # pinned from a GPU
    device = next(iter(outputs.values())).device
    if device.type != "cuda":
        return host, None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))  # the stream the copies were queued on
    return host, event


def _wait(batch, codes):
    host, event = codes
    if event is not None:
        event.synchronize()
    return batch, {name: v.numpy() for name, v in host.items()}
