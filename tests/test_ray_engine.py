"""ray_engine.py: `--engine ray` gives the cache `--engine local` gives, every row once, through
driver kills and actor kills, on a local Ray cluster started here (2 CPUs); the engine's
two-node and GPU scheduling are in test_ray_cluster.py."""
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_codes, write_image
from test_crash import batches_on_disk, kill_when, read

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; make test installs it)")

from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.datasets import load_dataset  # noqa: E402
from pipeline.extract import extract_features  # noqa: E402
from pipeline.store import partial_path  # noqa: E402
from pipeline.sources import ImageFiles  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, BATCH = "mobilenet_v3_small", 4
CACHE_NAME = f"{MODEL}-random.h5"
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's command-line tool


def start_cluster(*args):
    """A Ray head on this machine with `args` -> its address; `stop_cluster` ends it."""
    port = free_port()
    start_node("--head", f"--port={port}", "--include-dashboard=false", *args)
    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def start_node(*args, timeout=120):
    """`ray start --block` with `args`. Its Ray processes end with it, and it ends with this test run
    (prctl's parent-death signal, Linux), however that run ends: no Ray is left behind, and no other
    Ray on this machine is touched, as `ray stop` would."""
    log = tempfile.NamedTemporaryFile("w+", prefix="ray-start-", suffix=".log")
    node = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=_end_with_parent if sys.platform == "linux" else None,
                            env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})  # SIGTERM: end now
    _NODES.append(node)
    deadline = time.time() + timeout
    read = Path(log.name).read_text
    while "Ray runtime started" not in read():
        assert node.poll() is None and time.time() < deadline, f"ray start {' '.join(args)}: {read()}"
        time.sleep(0.1)


_NODES = []  # the `ray start --block` processes of this test run


def _end_with_parent():
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when this test run ends


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster():
    ray.shutdown()
    while _NODES:
        node = _NODES.pop()  # the joined nodes first, the head last
        node.terminate()
        node.wait(timeout=120)


@pytest.fixture(scope="module")
def cluster():
    address = start_cluster("--num-cpus=2")
    yield address
    stop_cluster()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """48 images in two classes with their own splits, and one corrupt file to skip."""
    root = tmp_path_factory.mktemp("data") / "toy"
    for split, n in (("train", 14), ("val", 5), ("test", 5)):
        for name, color in (("red", (220, 40, 40)), ("blue", (40, 40, 220))):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", size=(30 + i, 24 + i), color=color)
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.fixture(scope="module")
def local_cache(toy, tmp_path_factory):
    """The cache `--engine local` makes: what every Ray run must equal."""
    features = tmp_path_factory.mktemp("local")
    extract(toy, features, "local")
    return read(features / "toy" / CACHE_NAME)


def extract(root, features, engine, model=MODEL, **options):
    table = load_dataset(root.name, root.parent)
    return extract_features(table, load_backbone(model, "none"), ["penultimate"], features,
                            device="cpu" if engine == "local" else "auto",
                            precision="fp32", batch_size=BATCH, progress=False, engine=engine, **options)


def assert_same_cache(got, expected):
    ids, labels, split, codes, sha256 = got
    assert ids == expected[0] and split == expected[2] and sha256 == expected[4]
    np.testing.assert_array_equal(labels, expected[1])
    cosine = (codes * expected[3]).sum(1) / np.linalg.norm(codes, axis=1) / np.linalg.norm(expected[3], axis=1)
    assert cosine.min() >= 0.9999
    assert_same_codes(codes, expected[3], rtol=1e-4)


def test_auto_precision_on_a_cpu_cluster_is_the_drivers_own(cluster, monkeypatch):
    from pipeline import ray_engine
    from pipeline.extract import LocalEngine
    engine = ray_engine.RayEngine(cluster)
    monkeypatch.setattr(engine.ray, "remote", None)  # no task: this node runs an actor, and answers for it
    assert engine.gpus == 0 and engine.precision("auto") == LocalEngine("cpu").precision("auto")


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_precision_asked_of_a_cluster_the_driver_is_not_part_of_is_the_clusters_with_its_warnings(
        cluster, monkeypatch, precision):
    import warnings

    import torch

    from pipeline import ray_engine
    from pipeline.errors import PipelineWarning
    from pipeline.hardware import resolve_precision
    ours = lambda caught: [str(w.message) for w in caught if w.category is PipelineWarning]
    with warnings.catch_warnings(record=True) as expected:  # this machine is the cluster's: the same answer
        warnings.simplefilter("always")
        resolved = resolve_precision(precision, torch.device("cpu"))
    engine = ray_engine.RayEngine(cluster)
    monkeypatch.setattr(ray_engine, "_cpu_nodes", lambda ray: [])  # as if the driver ran elsewhere: a task answers
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert engine.precision(precision) == resolved
    assert ours(said) == ours(expected)
    assert "actors on cpu:" in engine.describe()  # the task's own description


@pytest.mark.parametrize("data", ["shared", "driver"])
def test_ray_makes_the_local_cache(cluster, toy, local_cache, tmp_path, data):
    result = extract(toy, tmp_path, "ray", ray_address=cluster, ray_data=data)
    assert result.status == "extracted" and result.rows == 49 and "ray:" in result.message
    assert_same_cache(read(result.path), local_cache)
    from pipeline.store import FeatureCache
    with FeatureCache(result.path) as cache:
        assert [id_ for id_, _ in cache.skipped] == ["train/red/broken.png"]  # skipped with its reason, as locally


def command(root, features, address):
    return [sys.executable, "-m", "pipeline", "extract", "--dataset", root.name, "--data-dir", str(root.parent),
            "--features-dir", str(features), "--model", MODEL, "--weights", "none", "--precision", "fp32",
            "--batch-size", str(BATCH), "--quiet", "--engine", "ray", "--ray-address", address]


def rows_on_disk(cache):
    """Rows in the partial folder's batch files (batch-<first>-<count>.npz)."""
    folder = partial_path(cache)
    names = os.listdir(folder) if folder.is_dir() else []
    return sum(int(name[:-4].split("-")[2]) for name in names if name.startswith("batch-") and name.endswith(".npz"))


def test_driver_killed_at_six_points_resumes_to_the_same_cache(cluster, toy, local_cache, tmp_path):
    cache = tmp_path / "toy" / CACHE_NAME
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    rng, points = random.Random(3), []
    for target in (1, 3, 5, 7, 9, 10):
        proc = subprocess.Popen(command(toy, tmp_path, cluster), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if not kill_when(proc, cache, target, rng):
            pytest.fail(f"the run finished before {target} batches were on disk: {proc.stderr.read()}")
        points.append(rows_on_disk(cache))
        assert points[-1] >= max(points[:-1], default=0)  # nothing written is ever lost
    final = subprocess.run(command(toy, tmp_path, cluster), env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr
    assert f"resumed {49 - points[-1]} images" in final.stdout, final.stdout  # only the rows not on disk
    assert not partial_path(cache).exists()
    assert_same_cache(read(cache), local_cache)


def ray_processes(title):
    """{pid: parent pid} of the Ray worker processes whose title (Ray sets it: ray::<task or actor>) has `title`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if cmdline.startswith("ray::") and title in cmdline:
            found[int(pid)] = parent
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's worker processes in /proc (Linux)")
def test_an_actor_killed_mid_run_is_replaced_and_no_row_is_lost_or_doubled(cluster, toy, tmp_path):
    """resnet18 (slower than the toy model, so the kill lands mid-run): its model actor is SIGKILLed
    once the first batch is on disk; Ray restarts it and retries its batch."""
    reference = read(extract(toy, tmp_path / "local", "local", model="resnet18").path)
    cache, killed = tmp_path / "ray" / "toy" / "resnet18-random.h5", []

    def kill_the_model_actor():
        deadline = time.time() + 120
        while time.time() < deadline and batches_on_disk(cache) < 1:
            time.sleep(0.005)
        for pid in ray_processes("_Codes"):
            os.kill(pid, signal.SIGKILL)
            killed.append(batches_on_disk(cache))

    killer = threading.Thread(target=kill_the_model_actor)
    killer.start()
    result = extract(toy, tmp_path / "ray", "ray", model="resnet18", ray_address=cluster)
    killer.join()
    assert killed and killed[0] < -(-49 // BATCH), f"the actor was not killed mid-run: {killed}"
    assert_same_cache(read(result.path), reference)


def test_decoded_pixels_travel_as_the_channels_last_memory_ray_keeps_as_it_is(toy):
    """A strided [B, 3, H, W] view would reach Ray's blocks and be transposed into a contiguous copy."""
    from pipeline.codes import SourceRows, to_batch
    from pipeline.ray_engine import _decode
    transform, rows = load_backbone(MODEL, "none").transform, np.arange(4)
    source = ImageFiles(sorted((toy / "train" / "red").glob("[0-9]*.png"))[:4])
    pixels = _decode({"data": rows}, source, transform, None)["image"]
    assert pixels.shape == (4, 224, 224, 3) and pixels.flags["C_CONTIGUOUS"]
    local = to_batch(SourceRows(source, transform, rows).__getitems__(rows)).images  # what the local engine runs
    np.testing.assert_array_equal(pixels, local.permute(0, 2, 3, 1).numpy())


def test_predict_on_ray_gives_the_local_codes(cluster, toy):
    from pipeline.extract import open_engine
    backbone = load_backbone(MODEL, "none")
    [layer] = backbone.resolve(["penultimate"])
    files = ImageFiles(sorted(toy.rglob("*.png")))
    rows = np.arange(len(files))
    got = {}
    for engine in ("local", "ray"):
        runner = open_engine(engine, "cpu" if engine == "local" else "auto", ray_address=cluster)
        codes = np.zeros((len(files), layer.dim), np.float32)
        for batch, out in runner.codes(files, backbone, [layer], rows, "fp32", BATCH):
            codes[batch.rows] = out[layer.name]
        got[engine] = codes
    assert_same_codes(got["ray"], got["local"], rtol=1e-4)
