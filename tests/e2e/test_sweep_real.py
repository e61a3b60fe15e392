"""The layer sweep on real data unlike ImageNet: the layer is chosen on val only,
every layer is scored for the report, and `train-head --layer auto` uses the choice."""
import json

import pytest

from conftest import ok as invoke

pytestmark = pytest.mark.e2e


def check_one_chosen(runs):
    chosen = [run for run in runs if run["chosen"]]
    assert len(chosen) == 1
    best_val = max(run["val_accuracy"] for run in runs)
    assert chosen[0]["val_accuracy"] == best_val
    return chosen[0]


def test_pneumoniamnist_sweep_mobilenet_v2(shared, mobilenet_weights, tmp_path):
    features, reports = tmp_path / "features", tmp_path / "reports"
    out = invoke("sweep", "--dataset", "pneumoniamnist", "--data-dir", shared / "data", "--model", "mobilenet_v2",
                 "--weights", mobilenet_weights, "--features-dir", features, "--reports-dir", reports, "--quiet")
    runs = json.loads((reports / "runs.json").read_text())
    layers = [run["layer"] for run in runs]
    assert len(runs) == 20 and len(set(layers)) == 20 and "avgpool" in layers and "features.17:avg" in layers
    assert all({"layer", "head", "val_accuracy", "test_accuracy", "chosen"} <= set(run) for run in runs)
    assert all((run["n_train"], run["n_val"], run["n_test"]) == (2428, 270, 468) for run in runs)
    chosen = check_one_chosen(runs)
    assert f"chosen on val: {chosen['layer']}" in out
    assert (f"`make train-head DATASET=pneumoniamnist MODEL=mobilenet_v2 WEIGHTS={mobilenet_weights} "
            f"FEATURES_DIR={features} LAYER=auto HEAD=softmax` uses it") in out  # the hint runs as printed
    # the earlier layer beats the last one on these X-rays (the point of the sweep)
    by_layer = {run["layer"]: run for run in runs}
    assert max(run["val_accuracy"] for run in runs) > by_layer["avgpool"]["val_accuracy"]

    trained = invoke("train-head", "--head", "softmax", "--dataset", "pneumoniamnist", "--layer", "auto",
                     "--features-dir", features)
    assert f"softmax on {chosen['layer']}" in trained
    html = (reports / "index.html").read_text()
    assert "depth.png" in html and "confusion.png" in html


def test_fashion_pixels_sweep_vgg16_random_taps(shared, tmp_path):
    """Pixel-CSV layout, VGG16 taps with random weights: shapes and dims as documented."""
    source = (shared / "data" / "fashion-mnist-subset" / "fashion_mnist_subset.csv").read_text().splitlines()
    root = tmp_path / "data" / "fashion"
    root.mkdir(parents=True)
    (root / "fashion.csv").write_text("\n".join(source[:141]) + "\n")  # header + 140 images
    features, reports = tmp_path / "features", tmp_path / "reports"
    invoke("sweep", "--dataset", "fashion", "--data-dir", tmp_path / "data", "--model", "vgg16", "--weights", "none",
           "--features-dir", features, "--reports-dir", reports, "--quiet")
    runs = json.loads((reports / "runs.json").read_text())
    dims = {run["layer"]: run["dim"] for run in runs}
    assert dims == {"conv1:avg": 64, "conv2:avg": 128, "conv3:avg": 256, "conv4:avg": 512, "conv5:avg": 512,
                    "fc6": 4096, "fc7": 4096}
    assert all(run["weights"] == "random" for run in runs)
    check_one_chosen(runs)
    assert "random (untrained)" in (reports / "report.md").read_text()
