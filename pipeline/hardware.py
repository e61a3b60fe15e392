"""Device and precision policy for stage one: what runs where, and how fast.

    device = resolve_device("auto")               # cuda when torch sees a GPU, else cpu
    precision = resolve_precision("auto", device) # bf16 only where the hardware runs it natively
    with autocast_for(device, precision): ...

Defaults here are measured choices (batch size, decode workers, glibc's allocator);
the README's bench section has the figures.
"""
import contextlib
import ctypes
import functools
import gc
import os
import platform
import warnings

import torch

from .errors import PipelineError, PipelineWarning
from .plan import PRECISIONS

__all__ = ["resolve_device", "resolve_precision", "native_cpu_bf16", "native_cpu_fp16", "default_batch_size",
           "default_workers", "describe_device", "cpu_name", "autocast_for", "keep_freed_memory",
           "collector_skips_existing", "cpu_has_amx"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


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
    Cascade Lake), where oneDNN emulates bf16 and runs slower than fp32 (README: Stage-one speed).
    bf16 or fp16 asked for on a CPU without its instructions is kept (the codes may need to match
    caches made elsewhere), with a PipelineWarning.
    """
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        native = {"bf16": native_cpu_bf16, "fp16": native_cpu_fp16, "fp32": lambda: True}[precision]
        if device.type == "cpu" and not native():
            warnings.warn(f"PRECISION={precision} on this CPU ({torch.backends.cpu.get_cpu_capability()}, without "
                          f"{precision} instructions) is emulated, many times slower than fp32 (README: Make "
                          f"targets); use PRECISION=auto "
                          f"({resolve_precision('auto', device)} here) unless the codes must match caches made in "
                          f"{precision}", PipelineWarning, stacklevel=2)
        return precision
    if device.type == "cuda":  # not is_bf16_supported(): by default it counts emulation (a T4, a V100)
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return "bf16" if native_cpu_bf16() else "fp32"


def native_cpu_bf16():
    """Whether this CPU has bf16 instructions (not oneDNN's emulation on plain AVX-512)."""
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # a torch.cpu private check
    return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and (avx512_bf16() or cpu_has_amx()))


def cpu_has_amx():
    """Whether this CPU has AMX tiles (Sapphire Rapids and later), where torch.compile's fused
    kernels pay most (README: Compiling the model)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())  # a torch.cpu private check


def native_cpu_fp16():
    """Whether this CPU has fp16 instructions (AVX512-FP16, AVX2-VNNI-2 or AMX-FP16), by mkldnn's own check:
    bf16's instructions (a Zen 4 EPYC) do not compute fp16."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def default_batch_size(device):
    """256 fills a GPU; on CPU 16, 32 and 64 run alike (README, bench), and 32 keeps activations moderate."""
    return 256 if device.type == "cuda" else 32


MAX_GPU_WORKERS = 32  # each holds PREFETCH_BATCHES batches of decoded images (38 MB at 256 x 224 x 224)


def default_workers(device):
    """Decoding processes: on a GPU every core but the one feeding it (at most MAX_GPU_WORKERS), decoding
    while it computes; on CPU none.

    On a GPU the model outruns any number of CPU decoders, so each core decodes (the README's GPU
    bench: 8 workers against 15 on 16 cores). On CPU the forward pass's threads already fill every
    core, and a decoder beside them stalls the whole pass (a preempted thread holds the others up at
    each barrier), so batches are decoded between forward passes by one thread per core
    (codes.image_batches); the README's bench section has the measurements.
    """
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_GPU_WORKERS, cores - 1))


def describe_device(device):
    """'cpu: AMD EPYC, 2 cores, 2 threads' or 'cuda: NVIDIA H200': recorded with each cache and run."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


@functools.cache
def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows (often only 'x86_64')."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def autocast_for(device, precision):
    """The autocast context running a model at `precision` (disabled for fp32)."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def autocast_dtype(precision):
    """The dtype autocast computes convolutions and matrix products in at `precision`; None for fp32."""
    return _DTYPES.get(precision)


@functools.cache
def keep_freed_memory():
    """Have glibc keep large freed blocks for reuse rather than hand them back to the OS.

    Blocks above glibc's mmap threshold (at most 32 MiB unless set) are mapped afresh at every
    allocation and unmapped at every free, so each forward pass page-faults its activations in
    again (README, bench). Peak memory is unchanged, but the process keeps its peak until it
    exits. A no-op where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = (1 << 31) - 1  # mallopt takes a C int: 1 << 31 wrapped to a negative number
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, trim))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def collector_skips_existing():
    """While the block runs, Python's cyclic garbage collector leaves out every object alive when it
    began (gc.freeze): the libraries imported (torch, h5py, ...), the model, the data set's table.

    Tracing a model allocates enough to set off a full collection, which walks all of those, a pause
    on one core that a short extract pays in full (README, bench). Objects made inside the block
    are collected as usual; the others go back to the collector at its end (gc.unfreeze). Left
    alone when the caller has frozen objects of its own (a server freezing before it forks).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
