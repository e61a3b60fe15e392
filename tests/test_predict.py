"""predict.py: a trained head + its backbone classify new files into a CSV, with the codes extract gave them."""
import csv

import pytest

from conftest import assert_same_codes, image_folder
from pipeline.backbones import load_backbone
from pipeline.datasets import load_dataset
from pipeline.errors import WeightsError
from pipeline.extract import extract_features
from pipeline.heads import LinearHead
from pipeline.predict import backbone_for, codes_of_files, predict_files
from pipeline.sources import ImageFiles
from pipeline.store import FeatureCache
from pipeline.train import train_head

RED_BLUE = {"red": (230, 20, 20), "blue": (20, 20, 230)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A softmax head on random-weight resnet18 codes of red vs blue images."""
    root = image_folder(tmp_path_factory.mktemp("p") / "data" / "colors", RED_BLUE,
                        (("train", 10), ("val", 4), ("test", 4)), size=lambda i: (30 + 3 * i, 30))
    table = load_dataset("colors", root.parent)
    result = extract_features(table, load_backbone("resnet18", "none"), ["penultimate"], root.parent.parent / "f",
                              precision="fp32", num_workers=0, progress=False)
    return root, result.path, train_head(result.path, "penultimate", "softmax")


def test_predict_computes_the_codes_extract_cached(trained):
    root, cache_path, result = trained
    with FeatureCache(cache_path) as cache:
        cached = dict(zip(cache.ids, cache.features("avgpool")[0]))
    ids = sorted(cached)
    X, failures = codes_of_files(LinearHead(result["head_file"]), ImageFiles([root / i for i in ids]), device="cpu")
    assert failures == [""] * len(ids)
    for id_, codes in zip(ids, X):
        assert_same_codes(codes, cached[id_])


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


def test_predict_a_single_file(trained, tmp_path):
    root, _, result = trained
    out = tmp_path / "one.csv"
    assert predict_files(result["head_file"], [root / "val" / "red" / "0.png"], out, device="cpu") == (1, 0)
    assert list(csv.DictReader(open(out)))[0]["path"] == str(root / "val" / "red" / "0.png")


def test_predict_refuses_other_weights(trained, tmp_path):
    import torch
    from torchvision.models import get_model
    root, _, result = trained
    other = tmp_path / "other.pth"
    torch.save(get_model("resnet18").state_dict(), other)  # unseeded: not the weights the head saw
    with pytest.raises(WeightsError, match="not those the head was trained on"):
        predict_files(result["head_file"], [root / "test"], tmp_path / "x.csv", weights=str(other))


def test_predict_refuses_a_head_on_codes_of_a_model_built_otherwise(tmp_path):
    """A head trained on a googlenet file's codes from before such files were built as pretrained
    (transform_input) saw other codes than its weights give now."""
    from types import SimpleNamespace
    import torch
    from torchvision.models import get_model
    path = tmp_path / "g.pth"
    torch.save(get_model("googlenet", weights=None, init_weights=False).state_dict(), path)
    sha = load_backbone("googlenet", str(path)).weights_sha256
    made = {"model": "googlenet", "weights": "file", "weights_sha256": sha, "weights_source": str(path)}
    with pytest.raises(WeightsError, match="built with no arguments, and these weights now build it with "
                                           "transform_input=True; extract its cache again"):
        backbone_for(SimpleNamespace(provenance=made))
    made_now = SimpleNamespace(provenance={**made, "model_args": "transform_input=True"})
    assert backbone_for(made_now).model.transform_input


def test_predict_says_where_the_weights_path_it_wants_came_from(tmp_path):
    """A head's weights file, moved since: the path is the head's provenance, not anything the user typed."""
    from types import SimpleNamespace
    made = {"model": "resnet18", "weights": "file", "weights_sha256": "ab" * 32,
            "weights_source": str(tmp_path / "w.pth")}
    with pytest.raises(WeightsError, match=r"the head was trained on codes of weights file .*w\.pth, which is not "
                                           r"there; pass WEIGHTS=<its new path>"):
        backbone_for(SimpleNamespace(provenance=made))


def test_a_file_name_that_is_not_utf8_is_skipped_with_the_remedy_and_the_rest_are_written(trained, tmp_path):
    """Linux names are bytes: one that is not UTF-8 reaches Python as surrogates, which a UTF-8 CSV cannot hold."""
    import os
    import shutil
    root, _, result = trained
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(root / "val" / "red" / "0.png", folder / "ok.png")
    try:
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
            f.write((root / "val" / "blue" / "0.png").read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses a file name that is not UTF-8")
    out = tmp_path / "pred.csv"
    assert predict_files(result["head_file"], [folder], out, device="cpu") == (1, 1)
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert [(r["path"], r["label"], r["skipped"]) for r in rows] == [
        (str(folder / "caf\\xe9.png"), "", "file name is not valid UTF-8; rename it"),
        (str(folder / "ok.png"), "red", "")]
    (folder / "ok.png").unlink()  # no file left to classify: the one row is still written
    assert predict_files(result["head_file"], [folder], out, device="cpu") == (0, 1)
    assert [r["skipped"] for r in csv.DictReader(open(out, encoding="utf-8"))] == [
        "file name is not valid UTF-8; rename it"]
