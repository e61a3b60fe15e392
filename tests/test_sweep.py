"""sweep.py: the layer chosen on val is kept beside the cache, and chooses nothing once the cache was made
again (other data, splits or codes): `train-head --layer auto` refuses it and the report ignores it.
The sweeps on real data are in tests/e2e/test_sweep_real.py."""
import json

import pytest

from conftest import invoke
from test_codes import photos  # noqa: F401 (a fixture)
from pipeline.errors import CacheError
from pipeline.paths import sweep_record_path
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
