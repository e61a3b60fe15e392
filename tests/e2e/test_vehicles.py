"""End to end on the real vehicles data with the real ImageNet MobileNetV2 weights:
extract once, the three heads, the report, predict. The accuracy bar is the issue's."""
import csv
import json

import pytest

from conftest import ok as invoke

pytestmark = pytest.mark.e2e


def test_vehicles_mobilenet_v2_end_to_end(shared, mobilenet_weights, tmp_path):
    features, reports = tmp_path / "features", tmp_path / "reports"
    extract = ("extract", "--dataset", "vehicles", "--data-dir", shared / "data", "--model", "mobilenet_v2",
               "--weights", mobilenet_weights, "--features-dir", features, "--quiet")
    assert "extracted 1646 images" in invoke(*extract)
    assert "nothing to do" in invoke(*extract)  # the cache is found, not rebuilt

    for head in ("svm", "softmax", "linear"):
        invoke("train-head", "--head", head, "--dataset", "vehicles", "--features-dir", features)
    invoke("report", "--features-dir", features, "--reports-dir", reports, "--data-dir", shared / "data")

    runs = {run["head"]: run for run in json.loads((reports / "runs.json").read_text())}
    assert set(runs) == {"svm", "softmax", "linear"}
    for run in runs.values():
        assert run["model"] == "mobilenet_v2" and run["layer"] == "avgpool" and run["weights"] == "file"
        assert (run["n_train"], run["n_val"], run["n_test"]) == (1152, 247, 247)
    assert runs["svm"]["test_accuracy"] >= 0.93
    assert runs["softmax"]["test_accuracy"] >= 0.93
    assert runs["linear"]["test_accuracy"] >= 0.90
    assert (reports / "report.md").exists() and (reports / "index.html").exists()

    # the leakage check: vehicles holds 68 groups of byte-identical images (148 images), and two groups
    # with conflicting labels: 523/709/872 (1) = 1302/1356/1906 (0), and 54 (1) = 2029 (0)
    checks = json.loads(open(runs["softmax"]["result_file"]).read())["data_checks"]
    assert checks["n_duplicate_groups"] == 68 and checks["n_duplicate_images"] == 148
    assert checks["n_groups_conflicting_labels"] == 2 and checks["n_skipped"] == 0
    assert checks["n_groups_across_splits"] > 0 and checks["n_eval_images_seen_in_train"] > 0
    conflicting = sorted(sorted(g["ids"]) for g in checks["groups"] if g["conflicting_labels"])
    assert conflicting == [["images/1302.jpg", "images/1356.jpg", "images/1906.jpg", "images/523.jpg",
                            "images/709.jpg", "images/872.jpg"], ["images/2029.jpg", "images/54.jpg"]]
    assert "labels disagree: " in (reports / "report.md").read_text()

    images = sorted((shared / "data" / "vehicles" / "images").glob("*.jpg"))[:12]
    head = runs["softmax"]["head_file"]
    invoke("predict", head, *images, "--out", tmp_path / "pred.csv", "--device", "cpu")
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert {r["label"] for r in rows} <= {"0", "1"} and all(0.5 <= float(r["score"]) <= 1 for r in rows)
