"""ray_engine.py on a cluster of two raylets on this machine (1 CPU each), the head with one
logical GPU: decoding runs on both nodes, the model actor is scheduled by its GPU (and runs on
the CPU, as torch finds no CUDA here), and the cache equals the local engine's."""
import os
import threading
import time

import pytest

from test_crash import read
from test_ray_engine import assert_same_cache, extract, ray_processes, start_cluster, start_node, stop_cluster

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; make test installs it)")


@pytest.fixture(scope="module")
def two_nodes():
    address = start_cluster("--num-cpus=1", "--num-gpus=1")
    start_node(f"--address={address}", "--num-cpus=1")
    deadline = time.time() + 60
    while len([node for node in ray.nodes() if node["Alive"]]) < 2 and time.time() < deadline:
        time.sleep(0.2)
    yield address
    stop_cluster()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's worker processes in /proc (Linux)")
@pytest.mark.parametrize("data", ["shared", "driver"])  # driver: read on the head only, decoded on both
def test_two_nodes_share_the_decoding_and_the_gpu_actor_is_scheduled(two_nodes, tmp_path, data):
    from conftest import write_image
    root = tmp_path / "data" / "toy"
    for split, n in (("train", 30), ("val", 9), ("test", 9)):
        for name, color in (("red", (220, 40, 40)), ("blue", (40, 40, 220))):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", size=(300 + i, 240 + i), color=color)
    reference = read(extract(root, tmp_path / "local", "local", model="resnet18").path)
    raylets, running = set(), [True]

    def watch():
        while running[0]:
            raylets.update(ray_processes("_decode").values())  # the raylet each decoding worker belongs to
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = extract(root, tmp_path / "ray", "ray", model="resnet18", ray_address=two_nodes, ray_data=data)
    finally:
        running[0] = False
        watcher.join()
    assert "ray: 2 node(s), 1 GPU(s)" in result.message
    assert len(raylets) >= 2, f"decoding ran under {len(raylets)} raylet(s)"
    assert_same_cache(read(result.path), reference)


def test_auto_precision_is_resolved_where_the_model_runs(two_nodes):
    from pipeline.extract import LocalEngine
    from pipeline.ray_engine import RayEngine
    engine = RayEngine(two_nodes)
    assert engine.gpus == 1
    assert engine.precision("auto") == LocalEngine("cpu").precision("auto")  # by a task on the GPU node
    assert "actors on cpu:" in engine.describe()  # that task's answer: no CUDA there, its CPU
