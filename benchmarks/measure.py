"""What the benches share: the machine as they describe it, peak memory as they report it, the cosine of
codes, and where ../shared keeps the real weights."""
import os
import platform
import resource
from pathlib import Path

import numpy as np

MOBILENET_WEIGHTS = Path("weights") / "mobilenet_v2-imagenet-dequantized.pth"  # under --shared


def peak_rss_mb():
    """This process's own peak resident set, in MB: VmHWM (Linux). Not ru_maxrss: Linux carries the parent's
    resident set at the fork into a child's ru_maxrss across exec, so a fresh child of a large bench process
    reports the parent's size (a 13 MB child of a 300 MB parent says 313 MB)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: kB (Linux), bytes (macOS)


def cosine(a, b):
    """Row-wise cosine similarity of two [N, D] arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def machine(device):
    """The CPU, cores, torch's threads and bf16 support, the GPU: what a figure was measured on."""
    import torch  # here, so that importing this module loads no torch (the heads bench's scikit-learn runs)
    import torchvision

    from pipeline.hardware import native_cpu_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_cpu_bf16": native_cpu_bf16(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version()}
