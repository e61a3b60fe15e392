"""What the benches share: peak memory as they report it, and where ../shared keeps the real weights."""
import resource
from pathlib import Path

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
