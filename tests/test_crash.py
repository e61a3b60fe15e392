"""Crash safety, end to end: `extract` killed with SIGKILL at 20+ points across runs, then
re-run, gives exactly the cache of an uninterrupted run; SIGINT stops cleanly.

Each run is a real `python -m pipeline extract` process; the test watches the partial
folder and kills the process once a chosen number of batches is on disk (plus a
random few milliseconds, so kills land anywhere in the write path).
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_codes, write_image
from pipeline.errors import IncompleteCacheError
from pipeline.store import FeatureCache, partial_path

REPO = Path(__file__).resolve().parents[1]
IMAGES = 60            # 30 batches of 2
BATCH = 2
KILLS = 22


@pytest.fixture
def toy(tmp_path):
    root = tmp_path / "data" / "toy"
    for split, n in (("train", 18), ("val", 6), ("test", 6)):
        for name, color in (("red", (220, 40, 40)), ("blue", (40, 40, 220))):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", size=(30 + i, 24), color=color)
    return root


def command(root, features):
    return [sys.executable, "-m", "pipeline", "extract", "--dataset", root.name, "--data-dir", str(root.parent),
            "--features-dir", str(features), "--model", "mobilenet_v3_small", "--weights", "none",
            "--device", "cpu", "--precision", "fp32", "--batch-size", str(BATCH), "--workers", "0", "--quiet"]


def start(root, features):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command(root, features), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal():
    """In the child before exec: SIGINT at its default, as a terminal gives it. A test run started in the
    background of a non-interactive shell ignores SIGINT, exec keeps it ignored, and Python then installs no
    KeyboardInterrupt handler: the SIGINT test would see the run finish."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def batches_on_disk(cache):
    folder = partial_path(cache)
    try:
        return sum(1 for name in os.listdir(folder) if name.startswith("batch-") and name.endswith(".npz"))
    except OSError:
        return 0


def kill_when(proc, cache, batches, rng):
    """SIGKILL `proc` once `batches` batch files exist (or it is assembling) -> False if it finished first."""
    while proc.poll() is None:
        assembling = cache.with_name(cache.name + ".assembling").exists()
        if batches_on_disk(cache) >= batches or assembling:
            time.sleep(rng.uniform(0, 0.003))  # within the write of the next batch, not batches later
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def read(cache):
    with FeatureCache(cache) as c:
        return list(c.ids), c.labels.copy(), list(c.split), c.features(c.layers[0])[0], list(c.sha256)


def test_sigkill_at_any_moment_loses_no_finished_row(toy, tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(command(toy, reference), env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = read(reference / "toy" / "mobilenet_v3_small-random.h5")

    features = tmp_path / "features"
    cache = features / "toy" / "mobilenet_v3_small-random.h5"
    rng = random.Random(5)
    targets = sorted(rng.sample(range(1, IMAGES // BATCH), KILLS - 2)) + [IMAGES // BATCH] * 2  # the last: assembling
    points = []
    for target in [0] + targets:
        proc = start(toy, features)
        if not kill_when(proc, cache, target, rng):
            break  # finished before the kill: nothing left to interrupt
        on_disk = batches_on_disk(cache)
        points.append(on_disk)
        assert on_disk >= min(points)  # nothing finished is ever lost
        if cache.exists():
            read(cache)  # a file under the final name is always whole
        elif partial_path(cache).exists():
            with pytest.raises(IncompleteCacheError, match="re-run the same `make extract` command"):
                FeatureCache(cache)
    assert len(set(points)) >= 20, points

    final = subprocess.run(command(toy, features), env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert not partial_path(cache).exists()
    got = read(cache)
    assert got[0] == expected[0] and got[2] == expected[2] and got[4] == expected[4]
    np.testing.assert_array_equal(got[1], expected[1])
    assert_same_codes(got[3], expected[3], rtol=1e-5)


def test_sigint_stops_cleanly_and_says_how_to_resume(toy, tmp_path):
    features = tmp_path / "features"
    cache = features / "toy" / "mobilenet_v3_small-random.h5"
    proc = start(toy, features)
    while batches_on_disk(cache) < 5 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "re-run the same command to resume" in err
    saved = batches_on_disk(cache) * BATCH
    assert f"interrupted: {saved} of {IMAGES} images are saved" in err
    again = subprocess.run(command(toy, features), env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resumed {IMAGES - saved} images" in again.stdout, again.stderr
