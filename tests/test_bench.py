"""benchmarks/stage_one.py on a tiny corpus: every figure is there and consistent. No figure's value
(no speed) is asserted: the bench is a script whose numbers belong to the machine."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import stage_one as bench
from pipeline.datasets import load_dataset

KEYS = ("ceiling_img_s", "pipeline_img_s", "baseline_img_s", "ratio_vs_ceiling", "ratio_vs_baseline",
        "rss_small_mb", "rss_large_mb", "rss_model", "model", "precision", "batch_size", "workers",
        "images", "image_sizes", "machine", "bf16_cosine_mean", "bf16_cosine_min", "jpeg_draft",
        "vehicles_softmax_test_acc_fp32", "vehicles_softmax_test_acc_bf16",
        "vehicles_softmax_test_acc_delta_points", "vehicles_bf16_cosine_mean", "targets", "steps_ms",
        "fast_cosine_mean", "fast_cosine_min", "startup_build_s", "startup_trace_s", "startup_prepare_s",
        "startup_first_batch_s", "steady_batch_s", "decode", "forward_cpu_share")


@pytest.fixture
def fake_shared(tmp_path):
    """A stand-in for ../shared: data/vehicles with 8 JPEGs (224x224) and its CSV, no weights."""
    source = tmp_path / "shared" / "data" / "vehicles"
    (source / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [["image_names", "emergency_or_not"]]
    for i in range(8):
        pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((224, 224), Image.BICUBIC).save(source / "images" / f"{i}.jpg")
        rows.append([f"{i}.jpg", str(i % 2)])
    with open(source / "emergency_train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return tmp_path / "shared"


@pytest.fixture
def small_sizes(monkeypatch):
    """Photo sizes scaled down so the tiny run stays fast (one still above 2x the resize: draft runs)."""
    monkeypatch.setattr(bench.corpus, "SIZES", ((300, 225), (640, 520)))


def test_corpus_is_an_imagefolder_with_splits_and_is_made_once(fake_shared, tmp_path, small_sizes):
    root = bench.make_corpus(fake_shared, tmp_path / "corpus", 8)
    table = load_dataset(root.name, root.parent)
    assert len(table) == 8 and set(table.split) == {"train", "val", "test"}
    assert table.class_names == ["emergency", "not_emergency"] and table.split_source.startswith("the data set")
    sizes = sorted({Image.open(root / i).size for i in table.ids})
    assert sizes == [(300, 225), (640, 520)]
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")}
    assert bench.make_corpus(fake_shared, tmp_path / "corpus", 8) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")} == stamp

    big = bench.repeat_corpus(root, 10)
    large = load_dataset(big.name, big.parent)
    assert len(large) == 80 and len(set(large.ids)) == 80
    assert sorted(large.split.tolist()) == sorted(np.repeat(table.split, 10).tolist())


def test_missing_vehicles_is_a_clear_error(tmp_path):
    with pytest.raises(bench.PipelineError, match="--shared"):
        bench.make_corpus(tmp_path / "nowhere", tmp_path / "corpus", 8)


def test_bench_writes_every_figure(fake_shared, tmp_path, small_sizes):
    result = bench.run_bench(model="mobilenet_v3_small", images=8, shared=fake_shared, batch_size=4, large_factor=3,
                             reports_dir=tmp_path / "reports", corpus_dir=tmp_path / "corpus", bf16=True,
                             say=lambda text: None)
    written = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    for key in KEYS:
        assert key in written, key
    for key in ("ceiling_img_s", "pipeline_img_s", "baseline_img_s", "rss_small_mb", "rss_large_mb"):
        assert written[key] > 0, key
    assert written["ratio_vs_ceiling"] == pytest.approx(written["pipeline_img_s"] / written["ceiling_img_s"], rel=0.01)
    assert written["ratio_vs_baseline"] == pytest.approx(written["pipeline_img_s"] / written["baseline_img_s"], rel=0.01)
    assert len(written["ceiling_runs_img_s"]) == bench.PIPELINE_RUNS + 1
    assert len(written["pipeline_runs_img_s"]) == bench.PIPELINE_RUNS
    assert written["ceiling_img_s"] == pytest.approx(sum(written["ceiling_runs_img_s"]) / 3, rel=0.01)
    assert len(written["baseline_runs_img_s"]) == 2  # before everything and after the long run, fresh processes
    assert written["baseline_img_s"] == pytest.approx(sum(written["baseline_runs_img_s"]) / 2, rel=0.01)
    assert written["images"] == 8 and written["rss_images_large"] == 24
    assert written["model"] == written["rss_model"] == "mobilenet_v3_small"
    assert written["ratio_vs_ceiling_large"] == pytest.approx(
        written["pipeline_large_img_s"] / (sum(written["ceiling_large_runs_img_s"]) / 2), rel=0.01)
    assert written["ceiling_large_runs_img_s"][0] == written["ceiling_runs_img_s"][-1]
    assert written["decode"] == "cpu"
    assert written["batch_size"] == 4 and written["workers"] >= 0 and written["precision"] in ("fp32", "bf16")
    assert 0.9 < written["bf16_cosine_min"] <= written["bf16_cosine_mean"] <= 1.0 + 1e-6
    assert written["vehicles_softmax_test_acc_fp32"] is None  # no MobileNetV2 weights in this shared
    assert 0.999 < written["fast_cosine_min"] <= written["fast_cosine_mean"] <= 1.0 + 1e-6
    assert {"decode", "resize", "crop", "to_tensor", "normalise", "fast_resize_crop_to_uint8",
            "fast_collate_per_batch", "fast_normalise_per_batch"} <= set(written["steps_ms"])
    assert {"cpu", "cores", "torch", "threads", "bf16_flags"} <= set(written["machine"])
    assert set(written["machine"]["bf16_flags"]) <= {"amx_bf16", "avx512_bf16"}  # which CPU: these machines differ
    assert set(written["targets"]) == {"ratio_vs_ceiling", "ratio_vs_ceiling_large", "ratio_vs_baseline", "rss_growth"}
    assert len(written["extract_cpu_ms_per_image"]) == 3 and min(written["extract_cpu_ms_per_image"]) > 0
    assert all(0 <= share <= 1 for share in written["extract_steal"] + written["extract_others"] + written["extract_waited_share"])
    assert "the model waited for decoded images" in bench.table_text(written)
    if written["device"] == "cpu":
        assert len(written["forward_cpu_share"]) == 3 and min(written["forward_cpu_share"]) > 0
    text = bench.table_text(written)
    assert "ceiling" in text and "baseline" in text and "bf16      cosine to fp32 codes" in text
    assert written["device_steps_ms"] is None and "JPEGs to a call" not in text  # decoded on the CPU
    on_device = {"jpegs": 256, "decode": 0.08, "decode_resize_crop": 0.1}
    assert ("decoded on cpu, 256 JPEGs to a call: ms per image 0.0800, with resize and crop 0.1000 (10000 img/s)"
            in bench.table_text({**written, "device_steps_ms": on_device}))
    assert f"{written['machine']['cores']} cores (" in text  # the bf16 flags, or that there are none

    assert written["bf16_not_measured"] is None
    unmeasured = {**written, "bf16_cosine_mean": None, "bf16_cosine_min": None}
    text = bench.table_text({**unmeasured, "bf16_not_measured": "no native bf16"})
    assert "bf16      not measured: this CPU runs no bf16 natively" in text
    assert "bf16      not measured (--no-bf16)" in bench.table_text({**unmeasured, "bf16_not_measured": "--no-bf16"})


@pytest.mark.parametrize("device, native, applies", [("cpu", True, True), ("cpu", False, False), ("cuda", False, True)])
def test_the_3x_line_over_the_tutorial_loop_applies_only_where_bf16_is_native(device, native, applies):
    from benchmarks.stage_one_table import targets

    figures = {"ratio_vs_ceiling": 0.95, "ratio_vs_ceiling_large": 0.97, "ratio_vs_baseline": 1.5, "rss_growth": 0.05}
    verdicts = targets({**figures, "device": device, "machine": {"native_cpu_bf16": native}})
    assert verdicts["ratio_vs_baseline"] == {"target": 3.0, "met": False, "applies": applies}
    assert all(v["met"] and v["applies"] for key, v in verdicts.items() if key != "ratio_vs_baseline")


def test_the_forward_passs_share_of_each_extracts_cpu_is_against_the_ceiling_around_it():
    from benchmarks.stage_one_table import forward_shares

    result = {"device": "cpu", "machine": {"threads": 2}, "ceiling_img_s": 100.0, "pipeline_runs_img_s": [80.0, 82.0],
              "pipeline_large_img_s": 90.0, "ceiling_large_runs_img_s": [120.0, 80.0],
              "extract_cpu_ms_per_image": [25.0, 20.0, 40.0]}
    assert forward_shares(result) == [0.8, 1.0, 0.5]  # 2 threads / 100 img/s = 20 ms a photo; the long run's 20 too
    assert forward_shares({**result, "pipeline_large_img_s": None, "extract_cpu_ms_per_image": [25.0, 20.0]}) == [0.8, 1.0]
    assert forward_shares({**result, "device": "cuda"}) is None


def test_ceiling_times_at_least_min_timed_batches_and_returns_the_codes_of_one_pass():
    """A GPU's batches are few (256 images each): the ceiling runs them again until enough were timed."""
    calls = []

    class Doubler(torch.nn.Module):
        def forward(self, images):
            calls.append(len(images))
            return {"codes": images.flatten(1) * 2}

    batches = [torch.ones(3, 1, 2, 2), torch.zeros(2, 1, 2, 2)]
    rate, codes = bench.forward_rate(Doubler(), batches, torch.device("cpu"), "fp32")
    assert len(calls) == 1 + bench.MIN_TIMED_BATCHES and rate > 0  # one warm-up, then 4 rounds of 2
    np.testing.assert_array_equal(codes["codes"], np.array([[2.0] * 4] * 3 + [[0.0] * 4] * 2))


def test_decode_workers_memory_is_sampled_only_in_runs_that_are_not_timed(fake_shared, tmp_path, small_sizes):
    """Sampling PSS walks the processes' page tables and stalls them: a timed run never samples; the bench
    samples the workers' memory in a run of its own."""
    root = bench.make_corpus(fake_shared, tmp_path / "corpus", 8)
    run = dict(weights="none", device="cpu", precision="fp32", batch_size=4, work=tmp_path, workers=1)
    timed = bench.fresh_extract(root, "mobilenet_v3_small", **run)
    assert "tree_pss_mb" not in timed and timed["images"] == 8
    assert bench.fresh_extract(root, "mobilenet_v3_small", sample_memory=True, **run)["tree_pss_mb"] > 0


def test_a_steps_cpu_use_splits_the_machines_time_between_it_the_host_and_other_processes():
    import os
    from benchmarks.measure import cpu_times, cpu_use

    hz = os.sysconf("SC_CLK_TCK")
    ticks = lambda user, idle, steal: [user * hz, 0, 0, idle * hz, 0, 0, 0, steal * hz]
    # 10 s of a machine's time: 6 s busy (2 of them this process's), 3 idle, 1 stolen by the host
    use = cpu_use((5.0, ticks(0, 0, 0)), (7.0, ticks(6, 3, 1)), images=100)
    assert use == {"cpu_ms_per_image": 20.0, "steal": 0.1, "others": 0.4}
    seconds, machine_ticks = cpu_times()
    assert seconds > 0 and len(machine_ticks) == 8  # this process has run; Linux's /proc/stat


def test_a_fresh_process_returns_its_result_stops_at_its_limit_and_reports_failure():
    from benchmarks.measure import in_fresh_process
    from pipeline.errors import PipelineError

    assert in_fresh_process("json", "loads", s='{"a": 1}') == {"a": 1}
    assert in_fresh_process("subprocess", "run", limit=2, args=["sleep", "30"]) == {"stopped": 2}
    with pytest.raises(PipelineError, match="bench step loads"):
        in_fresh_process("json", "loads", s="{")


def test_the_heads_bench_records_a_failed_head_and_goes_on():
    from benchmarks import heads

    failed = heads.fresh_figures(60, "no_such_function")
    assert list(failed) == ["failed"] and "AttributeError" in failed["failed"][0]


def test_device_steps_are_timed_per_jpeg(tmp_path):
    """--decode device's steps where the model runs (here the CPU's decoder): the JPEGs of one batch."""
    from conftest import write_jpeg
    from pipeline.sources import ImageFiles
    from preprocessing import device_step_costs
    paths = [write_jpeg(tmp_path / f"{k}.jpg", (320, 240), seed=k) for k in range(5)]
    (tmp_path / "flat.png").write_bytes(b"")  # not a JPEG: decoded by the worker, not counted
    costs = device_step_costs(ImageFiles(paths + [tmp_path / "flat.png"]), "mobilenet_v3_small", torch.device("cpu"),
                              images=6)
    assert costs["jpegs"] == 5 and costs["decode"] > 0 and costs["decode_resize_crop"] > 0
