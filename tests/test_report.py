"""pipeline.report on hand-made result JSONs: tables, best-on-val, plots, thumbnails, bad input."""
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import invoke, one_line_error
from pipeline.errors import PipelineError
from pipeline.report import best_run, collect_runs, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOYS = ["cat", "dog"]
SHAPES = ["<circle>", "square", "triangle"]  # "<circle>" checks HTML escaping

# (dataset, model, weights, layer, head, depth, val, test, extra)
RUNS = [
    ("toys", "resnet18", "IMAGENET1K_V1", "layer2:avg", "softmax", 0, 0.80, 0.85, {}),
    # chosen on val by the sweep, and the best val of toys, but not the best test
    ("toys", "resnet18", "IMAGENET1K_V1", "layer3:avg", "softmax", 1, 0.90, 0.70, {"data_checks": {
        "n_skipped": 1, "skipped": [{"id": "train/cat/bad.png", "reason": "truncated image data"}],
        "n_duplicate_groups": 1, "n_duplicate_images": 2, "n_groups_across_splits": 1,
        "n_groups_conflicting_labels": 1, "n_eval_images_seen_in_train": 1,
        "groups": [{"sha256": "ab", "ids": ["train/cat/0.png", "test/dog/0.png"], "labels": ["cat", "dog"],
                    "splits": ["train", "test"], "across_splits": True, "conflicting_labels": True}]}}),
    ("toys", "resnet18", "IMAGENET1K_V1", "avgpool", "softmax", 2, 0.85, 0.95, {"chosen": True}),  # a stale flag: ignored
    ("toys", "resnet18", "IMAGENET1K_V1", "avgpool", "svm", 2, 0.88, 0.99, {}),
    ("toys", "resnet18", "random", "avgpool", "softmax", 2, 0.50, 0.50, {}),
    ("shapes", "vgg16", "IMAGENET1K_V1", "features.10:avg", "softmax", 0, 0.60, 0.65, {}),
    ("shapes", "vgg16", "IMAGENET1K_V1", "classifier.4", "softmax", 1, 0.70, 0.60, {}),
    ("shapes", "vgg16", "IMAGENET1K_V1", "classifier.4", "svm", 1, 0.70, 0.90, {}),  # val tie: softmax sorts first
]


def make_result(dataset, model, weights, layer, head, depth, val, test, extra, root):
    names = TOYS if dataset == "toys" else SHAPES
    k = len(names)
    result = {
        "dataset": dataset, "layout": "imagefolder", "dataset_root": str(root), "model": model,
        "weights": weights, "weights_sha256": "", "layer": layer, "head": head, "depth": depth,
        "pooling": layer.split(":")[1] if ":" in layer else "none", "precision": "fp32", "dim": 64,
        "n_train": 12, "n_val": 6, "n_test": 6, "C": 0.01, "val_accuracy": val,
        "grid": [{"C": 0.01, "val_accuracy": val}], "test_accuracy": test, "test_balanced_accuracy": test,
        "test_macro_f1": test, "confusion_matrix": [[3 if i == j else 0 for j in range(k)] for i in range(k)],
        "per_class": [{"class": n, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for n in names],
        "class_names": names, "select_seconds": 0.1, "fit_seconds": 0.01,
        "misclassified": [{"id": "test/cat/0.png", "true": "cat", "predicted": "dog"},
                          {"id": "test/dog/1.png", "true": "dog", "predicted": "cat"},
                          {"id": "test/gone.png", "true": "cat", "predicted": "dog"}],
        "cache": f"features/{dataset}/{model}-{weights}.h5",
        "head_file": f"features/{dataset}/heads/{model}-{weights}.{layer}.{head}.h5",
        "extract_images_per_s": 100.0, "created": "2026-01-01T00:00:00+00:00",
    }
    return {**result, **extra}


def make_image_folder(root):
    """A tiny ImageFolder data set: train/ val/ test/ x cat/ dog/ x two 16x16 PNGs."""
    for split in ("train", "val", "test"):
        for c, name in enumerate(TOYS):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (200 * c, 100 + 50 * i, 50)).save(root / split / name / f"{i}.png")


def write_features(features, data):
    """The results of RUNS, and the record of a softmax sweep over the toys resnet18 cache that chose layer3 (its
    cache named as another FEATURES_DIR spelled it, /old/features: the cache beside the record is the one)."""
    sweep = {"cache": "/old/features/toys/resnet18-IMAGENET1K_V1.h5", "head": "softmax", "pooling": "avg",
             "chosen": "layer3:avg", "criterion": "val_accuracy", "layers": []}
    (features / "toys").mkdir(parents=True)
    (features / "toys" / "resnet18-IMAGENET1K_V1.sweep-softmax.json").write_text(json.dumps(sweep))
    (features / "toys" / "resnet18-random.sweep-softmax.json").write_text("{unreadable")  # ignored
    for run in RUNS:
        dataset, model, weights, layer, head = run[:5]
        root = data / "toys" if dataset == "toys" else data / "no-such-folder"
        heads = features / dataset / "heads"
        heads.mkdir(parents=True, exist_ok=True)
        result = make_result(*run, root=root)
        (heads / f"{model}-{weights}.{layer.replace(':', '-')}.{head}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    make_image_folder(tmp / "data" / "toys")
    write_features(tmp / "features", tmp / "data")
    (tmp / "features" / "toys" / "heads" / "broken.json").write_text("{not json")
    (tmp / "features" / "shapes" / "heads" / "partial.json").write_text(json.dumps({"dataset": "shapes"}))
    (tmp / "features" / "shapes" / "heads" / "model.pkl").write_bytes(b"\x80\x04never loaded")
    table, paths = write_report(tmp / "features", tmp / "reports", tmp / "data")
    return {"table": table, "paths": paths, "dir": tmp / "reports", "features": tmp / "features"}


def test_runs_json_has_one_entry_per_run_with_fields(report):
    runs = json.loads((report["dir"] / "runs.json").read_text())
    assert len(runs) == len(RUNS)
    for key in ("dataset", "model", "weights", "layer", "head", "n_train", "n_val", "n_test", "val_accuracy",
                "test_accuracy", "pooling", "dim", "C", "test_balanced_accuracy", "test_macro_f1", "head_file"):
        assert all(key in run for run in runs), key
    keys = [(r["dataset"], r["model"], r["weights"], r["head"], r["depth"]) for r in runs]
    assert keys == sorted(keys)
    chosen = {(r["dataset"], r["weights"], r["layer"], r["head"]): r["chosen"] for r in runs if "chosen" in r}
    assert chosen == {("toys", "IMAGENET1K_V1", "layer3:avg", "softmax"): True,  # from the sweep's own record
                      ("toys", "IMAGENET1K_V1", "layer2:avg", "softmax"): False,
                      ("toys", "IMAGENET1K_V1", "avgpool", "softmax"): False}


def test_best_run_is_chosen_on_val_not_test(report):
    runs, _ = collect_runs(report["features"])
    toys = [r for r in runs if r["dataset"] == "toys"]
    best = best_run(toys)
    assert (best["layer"], best["head"], best["test_accuracy"]) == ("layer3:avg", "softmax", 0.70)
    assert best["test_accuracy"] < max(r["test_accuracy"] for r in toys)
    tie = best_run([r for r in runs if r["dataset"] == "shapes"])
    assert (tie["layer"], tie["head"]) == ("classifier.4", "softmax")  # first in sort order
    md = (report["dir"] / "report.md").read_text()
    assert "Best on val: resnet18, IMAGENET1K_V1, layer3:avg, softmax" in md


def test_a_random_weights_run_is_best_only_when_nothing_else_is_there():
    trained = {"weights": "IMAGENET1K_V1", "val_accuracy": 0.875, "layer": "avgpool"}
    lucky = {"weights": "random", "val_accuracy": 1.0, "layer": "features.3:avg"}  # 8 val images, a lucky draw
    assert best_run([lucky, trained]) is trained
    assert best_run([lucky, {**lucky, "val_accuracy": 0.5}]) is lucky


def test_data_checks_of_the_best_run_are_shown(report):
    md = (report["dir"] / "report.md").read_text()
    assert "### Data checks" in md and "1 image skipped" in md and "1 val/test image also in train" in md
    assert "- skipped train/cat/bad.png: truncated image data" in md
    assert "- labels disagree: train/cat/0.png (cat, train), test/dog/0.png (dog, test)" in md
    page = (report["dir"] / "index.html").read_text()
    assert "<h3>Data checks</h3>" in page and "<li>skipped train/cat/bad.png: truncated image data</li>" in page


def test_random_weights_are_marked_everywhere(report):
    assert "random (untrained)" in report["table"]
    assert "random (untrained)" in (report["dir"] / "report.md").read_text()
    assert "random (untrained)" in (report["dir"] / "index.html").read_text()


def test_markdown_table_has_one_row_per_run(report):
    lines = (report["dir"] / "report.md").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| dataset")))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) == 2 + len(RUNS)
    assert all(line.count(" | ") == table[0].count(" | ") for line in table)


def test_text_table_has_one_row_per_run_and_warnings(report):
    lines = report["table"].splitlines()
    assert lines[0].split()[:3] == ["dataset", "model", "weights"]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(lines) == 2 + len(RUNS) + len(warnings)
    assert any("broken.json" in w and "not readable JSON" in w for w in warnings)
    assert any("partial.json" in w and "lacks" in w for w in warnings)
    assert all(w.count("\n") == 0 for w in warnings)


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_html_is_self_contained_and_every_image_is_a_png(report):
    text = (report["dir"] / "index.html").read_text()
    page = Page()
    page.feed(text)
    page.close()
    assert "script" not in page.tags and "link" not in page.tags
    assert page.images
    for src in page.images:
        assert "/" not in src and ":" not in src  # relative, next to index.html
        assert (report["dir"] / src).read_bytes()[:8] == PNG_SIGNATURE, src
    assert "&lt;circle&gt;" in text and "<circle>" not in text
    written = {Path(p).name for p in report["paths"]}
    assert set(page.images) <= written and {"runs.json", "report.md", "index.html"} <= written


def test_depth_plot_only_for_groups_with_two_or_more_layers(report):
    plots = {p.name for p in report["dir"].glob("*-depth.png")}
    assert plots == {"toys-resnet18-IMAGENET1K_V1-softmax-depth.png", "shapes-vgg16-IMAGENET1K_V1-softmax-depth.png"}


def test_misclassified_strip_from_the_image_folder(report):
    strip = report["dir"] / "toys-misclassified.png"
    assert strip.read_bytes()[:8] == PNG_SIGNATURE
    assert strip.name in (report["dir"] / "index.html").read_text()
    # shapes' dataset_root does not exist and data_dir has no shapes/: no strip, said on the page
    assert not (report["dir"] / "shapes-misclassified.png").exists()
    assert "No thumbnails" in (report["dir"] / "index.html").read_text()


def test_no_results_is_a_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match="no trained heads.*make train-head"):
        write_report(tmp_path / "features", tmp_path / "reports")
    heads = tmp_path / "features" / "toys" / "heads"
    heads.mkdir(parents=True)
    (heads / "bad.json").write_text("[1, 2")
    with pytest.raises(PipelineError, match="1 unusable"):
        write_report(tmp_path / "features", tmp_path / "reports")


def test_cli_report(report, tmp_path):
    ok = invoke("report", "--features-dir", report["features"], "--reports-dir", tmp_path)
    assert ok.exit_code == 0, ok.output
    assert "random (untrained)" in ok.output and "index.html" in ok.output
    empty = invoke("report", "--features-dir", tmp_path / "none", "--reports-dir", tmp_path)
    assert "no trained heads" in one_line_error(empty)


def test_result_schema_is_what_train_head_writes_and_report_reads():
    from pipeline.store.results import HeadResult, result_problem
    result = make_result(*RUNS[0], root="data/toys")
    assert result_problem(result) is None
    assert set(result) <= set(HeadResult.__annotations__)
    for key in HeadResult.__required_keys__:
        assert result_problem({k: v for k, v in result.items() if k != key}) == f"lacks {key}"
    assert result_problem({**result, "C": "0.1"}) == "C is not a float"
    assert result_problem({**result, "confusion_matrix": [[1, 2]]}) == "confusion_matrix is not 2x2"


def test_the_table_says_how_long_a_head_took_and_what_C_was_chosen_on():
    from pipeline.report import COLUMNS, _cells
    run = {**make_result(*RUNS[0], root="x"), "seconds": 12.34, "select_rows": 10000, "n_train": 42041}
    cells = dict(zip(COLUMNS, _cells(run)))
    assert cells["seconds"] == "12.3" and cells["C chosen on"] == "10000 of 42041"
    assert dict(zip(COLUMNS, _cells({**run, "select_rows": 42041})))["C chosen on"] == "train"
    older = dict(zip(COLUMNS, _cells(make_result(*RUNS[0], root="x"))))  # written before these were recorded
    assert older["C chosen on"] == "" and older["seconds"] == ""


def test_heads_of_a_cache_made_again_since_are_marked_stale_and_not_chosen(tmp_path):
    """Results name their cache's data and codes (older ones: when they were written); a cache made again of
    other ones (an update, ...) makes their numbers another data set's: marked, warned about, never best."""
    from pipeline.store import codes_key, split_key
    from test_store import SETTINGS, SPLIT, build_cache
    features = tmp_path / "features"
    write_features(features, tmp_path / "data")
    build_cache(features / "toys" / "resnet18-IMAGENET1K_V1.h5", finish_attrs={"created": "2026-01-02T00:00:00+00:00"})
    kept = features / "toys" / "heads" / "resnet18-IMAGENET1K_V1.avgpool.svm.json"
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "cache_key": codes_key(SETTINGS),
                               "split_key": split_key(SPLIT)}))  # same codes, same splits
    runs, warnings = collect_runs(features)
    stale = {(r["weights"], r["layer"], r["head"]) for r in runs if r.get("stale")}
    assert stale == {("IMAGENET1K_V1", layer, "softmax") for layer in ("layer2:avg", "layer3:avg", "avgpool")}
    assert [w for w in warnings if "made again" in w] == [
        "warning: features/toys/resnet18-IMAGENET1K_V1.h5 was made again, of other data, splits or codes, after these "
        "heads were trained on it: "
        "avgpool softmax, layer2:avg softmax, layer3:avg softmax; they are marked stale and not chosen as best: "
        "train them again"]
    assert best_run([r for r in runs if r["dataset"] == "toys"])["head"] == "svm"  # val 0.88, not layer3's 0.90
    table, _ = write_report(features, tmp_path / "reports", tmp_path / "data")
    assert table.count("softmax (stale)") == 3 and "made again" in (tmp_path / "reports" / "report.md").read_text()
    for head in (kept, features / "toys" / "heads" / "resnet18-random.avgpool.softmax.json"):
        head.unlink()  # every head of toys stale: the table shows them, no section calls one best
    write_report(features, tmp_path / "reports", tmp_path / "data")
    md = (tmp_path / "reports" / "report.md").read_text()
    assert md.count("softmax (stale)") == 3 and "## toys" not in md


def test_heads_trained_on_splits_a_rebuild_drew_again_are_stale(tmp_path):
    """A rebuild of the same data and codes that draws the splits again (an earlier update had kept them) scored
    the heads on another test set: stale. Results written before `split_key` compare the rows of each split."""
    import numpy as np
    from pipeline.train import train_head
    from test_heads import blobs
    from test_train import FIVE, make_cache
    X, y = blobs()
    cache, split = tmp_path / "features" / "toy" / "vgg16-random.h5", np.array(FIVE * (len(y) // 5))
    make_cache(cache, X, y, split, ["cat", "dog", "emu"], created="2026-01-01T00:00:00+00:00")
    result = cache.parent / "heads" / "vgg16-random.fc7.softmax.json"
    train_head(cache, "fc7", "softmax")
    older = result.with_name("vgg16-random.fc7.svm.json")  # as written before split_key, of the same cache
    older.write_text(json.dumps({**{k: v for k, v in json.loads(result.read_text()).items() if k != "split_key"},
                                 "head": "svm"}))

    def stale():
        cache.unlink()  # made again, as a rebuild does, of the same data and codes: later, the same cache_key
        make_cache(cache, X, y, split, ["cat", "dog", "emu"], created="2026-02-01T00:00:00+00:00")
        runs, warnings = collect_runs(tmp_path / "features")
        return {r["head"] for r in runs if r.get("stale")}, [w for w in warnings if "made again" in w]

    assert stale() == (set(), [])  # the same splits: both heads stand
    split = np.roll(split, 1)       # each split as large, other images in it
    assert stale() == ({"softmax"}, [f"warning: {cache} was made again, of other data, splits or codes, after these "
                                     "heads were trained on it: fc7 softmax; they are marked stale and not chosen "
                                     "as best: train them again"])
    split[:5] = "test"              # other sizes: the older result is stale too
    assert stale()[0] == {"softmax", "svm"}
