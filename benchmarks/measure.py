"""What the benches share: the machine as they describe it, peak memory as they report it, a function run
in a fresh process, the cosine of codes, and where ../shared keeps the real weights."""
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
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


_CHILD = ("import importlib, json, sys; sys.path.insert(0, sys.argv[4]); module = importlib.import_module(sys.argv[1]); "
          "print(json.dumps(getattr(module, sys.argv[2])(**json.loads(sys.argv[3]))))")


def in_fresh_process(module, function, sample_memory=False, limit=None, **args):
    """benchmarks/<module>.<function>(**args) in a new Python process -> its result (JSON), with
    `sample_memory` plus "tree_pss_mb": the peak PSS of the process and its DataLoader workers, sampled from
    /proc; {"stopped": limit} when it ran past `limit` seconds (it is killed). A process that fails -> PipelineError."""
    from pipeline.errors import PipelineError

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, module, function, json.dumps(args), str(here)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0.0]
    sampler = threading.Thread(target=_sample_pss, args=(proc, peak), daemon=True) if sample_memory else None
    if sampler:
        sampler.start()
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"stopped": limit}
    finally:
        if sampler:
            sampler.join()
    if proc.returncode != 0:
        raise PipelineError(f"bench step {function}({args}) failed:\n{err.strip()[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "tree_pss_mb": peak[0]} if sample_memory else result


def _sample_pss(proc, peak, every=0.5):
    while proc.poll() is None:
        peak[0] = max(peak[0], tree_pss_mb(proc.pid))
        time.sleep(every)


def tree_pss_mb(pid):
    """Proportional set size of a process and its descendants (shared pages counted once), in MB."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            continue  # the process ended meanwhile
    return total / 1024


def cpu_times():
    """(CPU seconds of this process and its ended children, the machine's /proc/stat ticks): cpu_use's input."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        ticks = []
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, ticks


def cpu_use(before, after, images):
    """What a timed step's CPU went to, from cpu_times() before and after it: its own CPU ms per image,
    and the shares of the machine's time that the host stole (a virtual machine's neighbours) and that
    other processes used. On a shared machine these tell a slow run's cause from a slow step."""
    seconds, ticks = after[0] - before[0], [b - a for a, b in zip(before[1], after[1])]
    use = {"cpu_ms_per_image": round(1000 * seconds / images, 2)}
    if len(ticks) == 8 and sum(ticks) > 0:
        total, hz = sum(ticks), os.sysconf("SC_CLK_TCK")
        busy = total - ticks[3] - ticks[4] - ticks[7]  # neither idle, waiting on the disk, nor stolen
        use.update(steal=round(ticks[7] / total, 4), others=round(max(0.0, busy / hz - seconds) * hz / total, 4))
    return use


def cosine(a, b):
    """Row-wise cosine similarity of two [N, D] arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # what `lscpu` shows on CPUs with native bf16: these machines differ


def cpu():
    """The CPU's name, its cores and which of BF16_FLAGS it has (Linux's /proc/cpuinfo), without torch."""
    name, flags, fields = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    family = f"family {fields['cpu family']}, model {fields['model']}" if "cpu family" in fields else None
    return {"cpu": fields.get("model name", name), "cpu_family": family, "cores": os.cpu_count(),
            "bf16_flags": [f for f in BF16_FLAGS if f in flags]}


def machine(device):
    """The CPU, cores, torch's threads and bf16 support, the GPU: what a figure was measured on."""
    import torch  # here, so that importing this module loads no torch (the heads bench's scikit-learn runs)
    import torchvision

    from pipeline.hardware import native_cpu_bf16

    return {**cpu(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_cpu_bf16": native_cpu_bf16(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version()}


def describe_cpu(m):
    """'AMD EPYC (family 23, model 49), 2 cores (AVX2, no native bf16)': a machine's CPU as the benches
    print it (the family tells CPUs of one name apart; torch's vector unit, where measured)."""
    family = f" ({m['cpu_family']})" if m.get("cpu_family") else ""
    units = [m["cpu_capability"]] if m.get("cpu_capability") else []
    return f"{m['cpu']}{family}, {m['cores']} cores ({', '.join(units + (m['bf16_flags'] or ['no native bf16']))})"
