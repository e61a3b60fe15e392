"""sweep.py: the layer chosen on val is kept beside the cache, and chooses nothing once the cache was made
again (other data, splits or codes): `train-head --layer auto` refuses it and the report ignores it.
The sweeps on real data are in tests/e2e/test_sweep_real.py."""
import json

import pytest

from conftest import invoke, one_line_error, write_jpeg
from test_codes import photos  # noqa: F401 (a fixture)
from pipeline.errors import CacheError
from pipeline.paths import sweep_record_path, sweep_record_paths
from pipeline.report import collect_runs
from pipeline.store import read_cache_identity
from pipeline.sweep import chosen_layer


def test_a_sweep_on_a_cache_made_again_since_chooses_nothing(photos, tmp_path):
    features = tmp_path / "features"
    out = invoke("sweep", "--dataset", photos.name, "--data-dir", photos.parent, "--model", "mobilenet_v3_small",
                 "--weights", "none", "--device", "cpu", "--quiet", "--features-dir", features,
                 "--reports-dir", tmp_path / "reports")
    assert out.exit_code == 0, out.output
    [cache] = (features / photos.name).glob("*.h5")
    record_path = sweep_record_path(cache, "softmax")
    record = json.loads(record_path.read_text())
    _, codes, splits, _ = read_cache_identity(cache)
    assert (record["cache_key"], record["split_key"]) == (codes, splits)
    chosen = chosen_layer(cache, "softmax")
    assert [run["layer"] for run in collect_runs(features)[0] if run.get("chosen")] == [chosen]

    record["split_key"] = "0" * 64  # as if the cache had drawn its splits again since
    record_path.write_text(json.dumps(record))
    with pytest.raises(CacheError, match=r"before it was made again .*make sweep HEAD=softmax.*LAYER=<name>"):
        chosen_layer(cache, "softmax")
    assert not any("chosen" in run for run in collect_runs(features)[0])

    del record["cache_key"], record["split_key"]  # a record from before the keys were kept: taken as current
    record_path.write_text(json.dumps(record))
    assert chosen_layer(cache, "softmax") == chosen


def test_sweeps_with_two_poolings_keep_a_record_each_and_auto_takes_the_best_on_val(photos, tmp_path):
    features = tmp_path / "features"
    for pooling in ("avg", "max"):
        out = invoke("sweep", "--dataset", photos.name, "--data-dir", photos.parent, "--model", "mobilenet_v3_small",
                     "--weights", "none", "--device", "cpu", "--quiet", "--pooling", pooling, "--features-dir",
                     features, "--reports-dir", tmp_path / "reports")
        assert out.exit_code == 0, out.output
    [cache] = (features / photos.name).glob("*.h5")
    paths = sweep_record_paths(cache, "softmax")
    assert paths == [sweep_record_path(cache, "softmax"), sweep_record_path(cache, "softmax", "max")]
    records = [json.loads(path.read_text()) for path in paths]
    assert [record["pooling"] for record in records] == ["avg", "max"]
    spatial = [row["layer"] for row in records[1]["layers"] if row["layer"].endswith(":max")]
    assert spatial, "the max sweep pools its spatial taps by max"

    def chosen_with(val_by_record):  # each record's choice given val accuracies, as if its heads had scored so
        for path, record, (layer, val) in zip(paths, records, val_by_record):
            record["chosen"] = layer
            record["layers"] = [{**row, "val_accuracy": val if row["layer"] == layer else 0.0} for row in record["layers"]]
            path.write_text(json.dumps(record))
        return chosen_layer(cache, "softmax"), [run["layer"] for run in collect_runs(features)[0] if run.get("chosen")]

    avg_layer = records[0]["layers"][-2]["layer"]
    assert chosen_with([(avg_layer, 0.9), (spatial[0], 0.95)]) == (spatial[0], [spatial[0]])
    assert chosen_with([(avg_layer, 0.9), (spatial[0], 0.85)]) == (avg_layer, [avg_layer])
    first_avg, last_max = records[0]["layers"][0]["layer"], spatial[-1]
    assert chosen_with([(first_avg, 0.9), (last_max, 0.9)])[0] == last_max  # a tie: the deeper
    same_depth = records[0]["layers"][len(spatial) - 1]["layer"]
    assert same_depth.endswith(":avg") and chosen_with([(same_depth, 0.9), (last_max, 0.9)])[0] == same_depth  # the first

    records[0]["split_key"] = "0" * 64  # avg's sweep chose on a cache made again since: only max's counts
    paths[0].write_text(json.dumps(records[0]))
    assert chosen_layer(cache, "softmax") == last_max


def test_a_sweep_on_a_changed_data_set_says_how_to_update_and_updates(photos, tmp_path):
    sweep = ["sweep", "--dataset", photos.name, "--data-dir", photos.parent, "--model", "mobilenet_v3_small",
             "--weights", "none", "--device", "cpu", "--quiet", "--features-dir", tmp_path / "features",
             "--reports-dir", tmp_path / "reports"]
    assert invoke(*sweep).exit_code == 0
    write_jpeg(photos / "train" / "a" / "new.jpg", (640, 480), seed=7)
    error = one_line_error(invoke(*sweep))
    assert "data set changed" in error and "--update (UPDATE=1 to make extract or make sweep)" in error
    assert "exclude each other" in invoke(*sweep, "--update", "--rebuild").output
    updated = invoke(*sweep, "--update")
    assert updated.exit_code == 0 and "updating" in updated.output and "1 new" in updated.output, updated.output
