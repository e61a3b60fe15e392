"""Predict: a trained head + its backbone classify new files into a CSV."""
import csv

import pytest

from conftest import write_image
from pipeline.backbones import load_backbone
from pipeline.datasets import load_dataset
from pipeline.errors import DataError, WeightsError
from pipeline.extract import extract_features
from pipeline.heads import train_head
from pipeline.predict import list_images, predict_files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A softmax head on random-weight resnet18 codes of red vs blue images."""
    root = tmp_path_factory.mktemp("p") / "data" / "colors"
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        for name, color in {"red": (230, 20, 20), "blue": (20, 20, 230)}.items():
            for i in range(n):
                write_image(root / split / name / f"{i}.png", size=(30 + 3 * i, 30), color=color)
    table = load_dataset("colors", root.parent)
    result = extract_features(table, load_backbone("resnet18", "none"), ["penultimate"], root.parent.parent / "f",
                              precision="fp32", num_workers=0, progress=False)
    return root, result.path, train_head(result.path, "penultimate", "softmax")


def test_predict_matches_the_cached_codes(trained, tmp_path):
    root, cache_path, result = trained
    out = tmp_path / "pred.csv"
    assert predict_files(result["head_file"], [root / "test"], out, device="cpu") == (8, 0)
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == sorted(str(p) for p in (root / "test").rglob("*.png"))
    truth = {r["path"]: r["path"].split("/")[-2] for r in rows}
    accuracy = sum(r["label"] == truth[r["path"]] for r in rows) / len(rows)
    assert accuracy == pytest.approx(result["test_accuracy"])  # same codes, same head, same answers
    assert all(0.5 <= float(r["score"]) <= 1.0 for r in rows)  # winner's probability, two classes


def test_predict_single_file_and_errors(trained, tmp_path):
    root, _, result = trained
    out = tmp_path / "one.csv"
    assert predict_files(result["head_file"], [root / "val" / "red" / "0.png"], out, device="cpu") == (1, 0)
    with pytest.raises(DataError, match="no such file or folder"):
        list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images([tmp_path / "empty"])


def test_predict_refuses_other_weights(trained, tmp_path):
    import torch
    from torchvision.models import get_model
    root, _, result = trained
    other = tmp_path / "other.pth"
    torch.save(get_model("resnet18").state_dict(), other)  # unseeded: not the weights the head saw
    with pytest.raises(WeightsError, match="not those the head was trained on"):
        predict_files(result["head_file"], [root / "test"], tmp_path / "x.csv", weights=str(other))
