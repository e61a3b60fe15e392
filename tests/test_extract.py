"""Stage one: the cache it writes, cache hits, stale caches, resume, and that every
execution path (precision, batch size, workers) gives the same codes."""
import gc
import os

import h5py
import numpy as np
import pytest
import torch
from torchvision.models import get_model

from conftest import assert_same_codes, image_folder, write_image
from test_layouts import balanced, csv_rows, make_pixel_set, write_csv
from pipeline import backbones, extract
from pipeline.backbones import load_backbone
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError, IncompleteCacheError, PipelineError, PipelineWarning, StaleCacheError
from pipeline.extract import duplicates_rule, extract_features
from pipeline.store import FeatureCache, PartialCache, extraction_lock, partial_path

COLORS = {"red": (220, 40, 40), "blue": (40, 40, 220)}


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder with its own splits: 8 train, 4 val, 4 test per class."""
    return image_folder(tmp_path / "data" / "toy", COLORS, (("train", 8), ("val", 4), ("test", 4)),
                        size=lambda i: (40 + i, 30))


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("mobilenet_v2", "none")


def run(folder, backbone, layers=("penultimate",), **options):
    options = {"precision": "fp32", "batch_size": 5, "num_workers": 0, "progress": False, **options}
    table = load_dataset(folder.name, folder.parent)
    return extract_features(table, backbone, list(layers), folder.parent.parent / "features", **options)


def test_cache_layout(folder, backbone):
    result = run(folder, backbone, ["penultimate", "features.4"])
    assert result.status == "extracted" and result.rows == 32
    assert result.path == folder.parent.parent / "features" / "toy" / "mobilenet_v2-random.h5"
    with h5py.File(result.path, "r") as h5:  # what a user sees with plain h5py
        assert h5["layers/avgpool"].shape == (32, 1280) and h5["layers/avgpool"].dtype == np.float32
        assert h5["layers/features.4:avg"].shape == (32, 32) and h5["layers/avgpool"].chunks is not None
        assert h5["labels"].dtype == np.int64 and set(h5["split"].asstr()[:]) == {"train", "val", "test"}
        assert h5["ids"].asstr()[0] == "test/blue/0.png"
        assert h5["layers/features.4:avg"].attrs["pooling"] == "avg"
        for key in ("class_names", "model", "weights", "weights_sha256", "transform", "pooling",
                    "dataset_fingerprint", "versions", "device", "precision", "images_per_s"):
            assert key in h5.attrs, key
        assert h5.attrs["weights"] == "random" and h5.attrs["precision"] == "fp32"


def test_data_a_head_would_refuse_is_warned_of_before_extraction(folder, backbone):
    write_image(folder / "val" / "Red" / "0.png")  # a misspelled class folder: a class without train images
    with pytest.warns(PipelineWarning, match=r"toy: classes \['Red'\] have no train images \(a misspelled folder\?\)"):
        assert run(folder, backbone).status == "extracted"  # a warning: the codes are made all the same
    one = image_folder(folder.parent / "one", {"red": COLORS["red"]})
    with pytest.warns(PipelineWarning, match=r"one: one class only \(red\); a classifier needs at least two"):
        run(one, backbone)


def test_the_model_is_traced_with_the_objects_alive_before_left_out_of_the_collector(folder, backbone,
                                                                                    monkeypatch):
    frozen, plan = [], extract.plan_extraction
    monkeypatch.setattr(extract, "plan_extraction", lambda *a, **k: frozen.append(gc.get_freeze_count()) or plan(*a, **k))
    assert run(folder, backbone).status == "extracted"
    assert frozen[0] > 0 and gc.get_freeze_count() == 0


@pytest.mark.parametrize("amx", [True, False])
def test_a_long_cpu_run_on_an_amx_cpu_is_told_of_compile(folder, backbone, monkeypatch, amx):
    monkeypatch.setattr(extract, "TIP_ROWS", 10)  # the toy set's 32 images count as long
    monkeypatch.setattr(extract, "cpu_has_amx", lambda: amx)
    message = run(folder, backbone, device="cpu").message
    assert ("this CPU has AMX: on runs this long COMPILE=1 (--compile)" in message) == amx
    monkeypatch.setattr(extract, "TIP_ROWS", 33)
    assert "COMPILE=1" not in run(folder, backbone, device="cpu", rebuild=True).message


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_long_gpu_run_decoding_on_the_cpu_is_told_of_decoding_on_the_device(backbone, monkeypatch, decode):
    """Checked on the tip alone (a GPU run needs a GPU): shown where a device decoder works for the recipe."""
    runner = extract.LocalEngine("cpu", decode=decode)
    runner.device = torch.device("cuda")
    monkeypatch.setattr(extract, "check_device_decoding", lambda transform, device: None)  # a decoder works
    tip = extract._speed_tip(runner, extract.TIP_ROWS, backbone.transform)
    assert ("DECODE=device (--decode device) ran 1.5x faster" in tip) == (decode == "cpu")
    assert extract._speed_tip(runner, extract.TIP_ROWS - 1, backbone.transform) == ""

    def no_decoder(transform, device):
        raise PipelineError("no JPEG decoder decodes on cuda")
    monkeypatch.setattr(extract, "check_device_decoding", no_decoder)
    assert extract._speed_tip(runner, extract.TIP_ROWS, backbone.transform) == ""


def test_extract_says_how_long_the_model_waited_for_decoded_images(folder, backbone):
    result = run(folder, backbone)
    assert 0 < result.waited_s < result.seconds
    assert f"the model waited {result.waited_s / result.seconds:.0%} of the time for decoded images" in result.message
    with FeatureCache(result.path) as cache:
        assert cache.attrs["waited_for_decoding_s"] == round(result.waited_s, 2)
    assert "waited" not in run(folder, backbone).message  # a hit: nothing measured


def test_same_request_is_a_cache_hit(folder, backbone):
    first = run(folder, backbone)
    mtime = first.path.stat().st_mtime_ns
    again = run(folder, backbone)
    assert again.status == "hit" and again.rows == 0 and first.path.stat().st_mtime_ns == mtime
    assert "nothing to do" in again.message


def codes_by_id(path, layer="avgpool"):
    with FeatureCache(path) as cache:
        return dict(zip(cache.ids, cache.features(layer)[0])), dict(zip(cache.ids, cache.split))


def avgpool_codes(result, remove=False):
    """The cached avgpool codes [N, D] of an extract result; `remove`: delete the cache after reading."""
    with FeatureCache(result.path) as cache:
        codes = cache.features("avgpool")[0]
    if remove:
        result.path.unlink()
    return codes


def test_changed_data_is_never_served_from_the_old_cache(folder, backbone):
    first = run(folder, backbone)
    write_image(folder / "train" / "red" / "new.png", color=(250, 0, 0))
    with pytest.raises(StaleCacheError, match=r"1 new \(first: train/red/new.png\).*--update.*--rebuild"):
        run(folder, backbone)
    second = run(folder, backbone, rebuild=True)
    assert second.status == "extracted" and second.rows == 33 and first.path == second.path
    with FeatureCache(second.path) as cache:
        assert len(cache.ids) == 33 and "train/red/new.png" in set(cache.ids)


def test_the_duplicates_rule_stays_with_the_cache_and_a_change_of_it_is_an_update(folder, backbone):
    """The toy folder's train/val/test images of one index are byte-identical: dropping them leaves 16 rows."""
    features = folder.parent.parent / "features"
    rule = lambda drop=None: duplicates_rule(features, folder.name, "mobilenet_v2", "none", drop)

    def extract(drop):
        table = load_dataset(folder.name, folder.parent, drop_duplicates=rule(drop))
        return extract_features(table, backbone, ["penultimate"], features, precision="fp32", batch_size=5,
                                num_workers=0, progress=False)
    assert rule() is False  # no cache yet: kept
    dropped = extract(True)
    assert dropped.status == "extracted" and dropped.rows == 16 and rule() is True
    assert extract(None).status == "hit"  # said no more: as the cache was made ("the data set changed" before)
    kept = extract(False)  # said otherwise: the dropped images are computed, the rest copied
    assert kept.status == "updated" and kept.rows == 16 and "to keep duplicates" in kept.message
    assert extract(None).status == "hit" and rule() is False
    again = extract(True)
    assert again.status == "updated" and again.rows == 0 and "to drop duplicates" in again.message
    with FeatureCache(again.path) as cache:
        assert len(cache.ids) == 16


def test_update_computes_only_new_and_changed_images(folder, backbone):
    first = run(folder, backbone)
    old, old_split = codes_by_id(first.path)
    write_image(folder / "train" / "red" / "new.png", color=(250, 0, 0))
    (folder / "val" / "blue" / "3.png").unlink()
    write_image(folder / "test" / "red" / "1.png", size=(41, 30), color=(10, 200, 10))  # other pixels
    with pytest.raises(StaleCacheError, match="1 new .*1 removed .*1 changed"):
        run(folder, backbone)
    updated = run(folder, backbone, update=True)
    assert updated.status == "updated" and updated.rows == 2  # the new and the changed image
    assert "1 new" in updated.message and "1 removed" in updated.message
    now, now_split = codes_by_id(updated.path)
    assert set(now) == set(old) - {"val/blue/3.png"} | {"train/red/new.png"}
    for id_ in set(now) - {"train/red/new.png", "test/red/1.png"}:
        np.testing.assert_array_equal(now[id_], old[id_])  # copied, not recomputed
        assert now_split[id_] == old_split[id_]
    assert not np.allclose(now["test/red/1.png"], old["test/red/1.png"], rtol=1e-3, atol=0)
    assert now_split["test/red/1.png"] == "test"
    updated.path.unlink()
    fresh, _ = codes_by_id(run(folder, backbone).path)  # the same data from scratch
    for id_ in now:
        assert_same_codes(now[id_], fresh[id_])
    assert run(folder, backbone, update=True).status == "hit"


def test_update_follows_moved_renamed_and_touched_files_by_their_bytes(folder, backbone):
    """Nothing is computed for a renamed file, one moved to another class (relabelled) or out of the data
    set's own test folder (it takes its new split), or one touched (new time, same bytes)."""
    first = run(folder, backbone)
    old, old_split = codes_by_id(first.path)
    moves = {"train/red/2.png": "train/red/renamed.png", "train/blue/3.png": "train/red/was_blue.png",
             "test/red/1.png": "train/red/from_test.png"}
    for before, after in moves.items():
        (folder / before).rename(folder / after)
    os.utime(folder / "val/blue/0.png", ns=(1, 1))
    with pytest.raises(StaleCacheError, match="3 moved or renamed .*1 touched, the same bytes .*1 relabelled"):
        run(folder, backbone)
    updated = run(folder, backbone, update=True)
    assert updated.status == "updated" and updated.rows == 0
    assert not any(word in updated.message for word in ("new", "removed", "changed", "images/s"))  # no rate of 0
    now, now_split = codes_by_id(updated.path)
    assert set(now) == set(old) - set(moves) | set(moves.values())
    for before, after in [*moves.items(), ("val/blue/0.png", "val/blue/0.png")]:
        np.testing.assert_array_equal(now[after], old[before])
    assert now_split["train/red/renamed.png"] == "train" and now_split["train/red/from_test.png"] == "train"
    with FeatureCache(updated.path) as cache:
        labels = dict(zip(cache.ids, (cache.class_names[k] for k in cache.labels)))
    assert labels["train/red/was_blue.png"] == "red"
    assert run(folder, backbone, update=True).status == "hit"


def test_a_renamed_file_keeps_its_drawn_split(tmp_path, backbone):
    """Where the split is drawn, a renamed image keeps the split it had: a new draw could put a train image
    into test."""
    root = tmp_path / "data" / "drawn"
    for name, color in COLORS.items():
        for i in range(10):
            write_image(root / name / f"{i}.png", size=(30 + i, 30), color=color)
    first = run(root, backbone)
    _, old_split = codes_by_id(first.path)
    renamed = {id_: id_.replace(".png", "-renamed.png") for id_, split in old_split.items() if split != "train"}
    for before, after in renamed.items():
        (root / before).rename(root / after)
    updated = run(root, backbone, update=True)
    assert updated.rows == 0 and f"{len(renamed)} moved or renamed" in updated.message
    _, now_split = codes_by_id(updated.path)
    assert all(now_split[after] == old_split[before] for before, after in renamed.items())


def test_a_swap_the_stamps_cannot_see_is_found_once_the_files_are_touched(tmp_path, backbone):
    """Files of one size and one time swapped between class folders keep their stamps: the cache is found
    as it was (README: the data set changed). Touched, they are compared by their bytes and relabelled."""
    root = tmp_path / "data" / "bmp"
    for name, color in COLORS.items():
        for i in range(6):
            os.utime(write_image(root / name / f"{i}.bmp", size=(32, 32), color=color), ns=(7, 7))
    run(root, backbone)
    (root / "red").rename(root / "swap")
    (root / "blue").rename(root / "red")
    (root / "swap").rename(root / "blue")
    assert run(root, backbone, update=True).status == "hit"
    for path in root.rglob("*.bmp"):
        os.utime(path)
    updated = run(root, backbone, update=True)
    assert updated.rows == 0 and "12 relabelled" in updated.message and "12 moved or renamed" in updated.message


def test_a_changed_image_keeps_its_drawn_split(tmp_path, backbone):
    """Other bytes under an old name: recomputed, in the split it had (a new draw could move it into test)."""
    root = tmp_path / "data" / "drawn"
    for name, color in COLORS.items():
        for i in range(10):
            write_image(root / name / f"{i}.png", size=(30 + i, 30), color=color)
    _, old_split = codes_by_id(run(root, backbone).path)
    for k, id_ in enumerate(old_split):
        write_image(root / id_, size=(50, 20 + k), color=(90, 90, 90))
    for name in COLORS:  # new images: the draw over the table differs from the first one
        for i in range(10, 16):
            write_image(root / name / f"{i}.png", size=(30 + i, 30), color=COLORS[name])
    updated = run(root, backbone, update=True)
    assert updated.rows == 32 and "20 changed" in updated.message
    now_split = codes_by_id(updated.path)[1]
    assert {id_: now_split[id_] for id_ in old_split} == old_split


def test_a_touched_file_keeps_its_row_before_a_new_copy_of_it(tmp_path, backbone):
    """A touched image and a new copy of it listed first: the image keeps its row and split, the copy is new."""
    root = tmp_path / "data" / "drawn"
    for i in range(10):
        write_image(root / "red" / f"{i}.png", size=(30 + i, 30), color=COLORS["red"])
        write_image(root / "blue" / f"{i}.png", size=(30 + i, 30), color=COLORS["blue"])
    old, old_split = codes_by_id(run(root, backbone).path)
    original = next(id_ for id_, split in old_split.items() if split == "test")
    copy = original.replace(".png", "-copy.png")  # sorts before the original
    os.utime(root / original, ns=(1, 1))
    (root / copy).write_bytes((root / original).read_bytes())
    updated = run(root, backbone, update=True)
    assert updated.rows == 1 and f"1 new (first: {copy})" in updated.message
    assert f"1 touched, the same bytes (first: {original})" in updated.message and "moved" not in updated.message
    now, now_split = codes_by_id(updated.path)
    assert now_split[original] == "test"
    np.testing.assert_array_equal(now[original], old[original])


@pytest.mark.parametrize("edit", ["delete", "insert"])
def test_update_of_pixel_rows_follows_each_image_not_its_row_number(tmp_path, backbone, edit):
    """A pixel CSV's ids are row numbers: deleting or inserting a row renumbers the rows below it, and each
    image keeps its split and its codes (none moves from test to train), found by its content."""
    root, _ = make_pixel_set(tmp_path / "data" / "px", balanced(15, [0, 1]))
    first = run(root, backbone)
    with FeatureCache(first.path) as cache:
        before = {h: (s, c) for h, s, c in zip(cache.sha256, cache.split, cache.features("avgpool")[0])}
    rows = csv_rows(root, "pixels.csv")
    if edit == "delete":
        del rows[3]
    else:
        rows.insert(2, ["1"] + ["7"] * 16)
    write_csv(root / "pixels.csv", rows)
    updated = run(root, backbone, update=True)
    if edit == "delete":
        assert updated.rows == 0 and "1 removed (first: 2)" in updated.message
    else:
        assert updated.rows == 1 and "1 new (first: 1)" in updated.message
    assert "moved to another row" in updated.message and "changed" not in updated.message
    with FeatureCache(updated.path) as cache:
        after = {h: (s, c) for h, s, c in zip(cache.sha256, cache.split, cache.features("avgpool")[0])}
    assert len(set(before) - set(after)) == (edit == "delete") and len(set(after) - set(before)) == (edit == "insert")
    for h in set(before) & set(after):
        assert after[h][0] == before[h][0]
        np.testing.assert_array_equal(after[h][1], before[h][1])


def test_relabelled_images_keep_their_codes(tmp_path, backbone):
    root = tmp_path / "data" / "csvset"
    for i in range(24):
        write_image(root / "images" / f"{i}.png", size=(30 + i, 30), color=(20 * (i % 10), 40, 200))
    lines = ["file,label"] + [f"{i}.png,{'ab'[i % 2]}" for i in range(24)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    first = run(root, backbone)
    old, _ = codes_by_id(first.path)
    lines[1] = "0.png,b"
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    updated = run(root, backbone, update=True)
    assert updated.rows == 0 and "1 relabelled (first: images/0.png)" in updated.message
    with FeatureCache(updated.path) as cache:
        row = list(cache.ids).index("images/0.png")
        assert cache.class_names[cache.labels[row]] == "b"
        np.testing.assert_array_equal(cache.features("avgpool")[0][row], old["images/0.png"])


def test_bad_files_are_skipped_and_no_label_moves(folder, backbone):
    clean = run(folder, backbone)
    expected, _ = codes_by_id(clean.path)
    with FeatureCache(clean.path) as cache:
        labels = {i: cache.class_names[k] for i, k in zip(cache.ids, cache.labels)}
    clean.path.unlink()
    (folder / "train" / "red" / "empty.png").write_bytes(b"")
    (folder / "train" / "blue" / "notes.png").write_text("not an image")
    (folder / "val" / "red" / "cut.png").write_bytes((folder / "val" / "red" / "0.png").read_bytes()[:60])
    result = run(folder, backbone)
    assert "3 images skipped" in result.message and "extracted 32 images" in result.message  # not 35
    with FeatureCache(result.path) as cache:
        skipped = dict(cache.skipped)
        assert set(skipped) == {"train/red/empty.png", "train/blue/notes.png", "val/red/cut.png"}
        assert "empty" in skipped["train/red/empty.png"] and "not an image" in skipped["train/blue/notes.png"]
        assert {i: cache.class_names[k] for i, k in zip(cache.ids, cache.labels)} == labels
        for id_, values in zip(cache.ids, cache.features("avgpool")[0]):
            assert_same_codes(values, expected[id_])


def test_a_second_extraction_is_told_who_holds_the_cache(folder, backbone):
    path = folder.parent.parent / "features" / "toy" / "mobilenet_v2-random.h5"
    with extraction_lock(path):
        with pytest.raises(CacheError, match="another `make extract` is writing this cache \\(pid"):
            run(folder, backbone)
    assert run(folder, backbone).status == "extracted"


def test_other_precision_is_another_cache(folder, backbone):
    run(folder, backbone, precision="fp32")
    assert run(folder, backbone, precision="bf16").status == "extracted"


def test_more_layers_extends_the_cache(folder, backbone):
    run(folder, backbone, ["penultimate"])
    result = run(folder, backbone, ["features.10:max"])
    assert result.status == "extracted" and result.layers == ["features.10:max", "avgpool"]
    assert run(folder, backbone, ["avgpool", "features.10:max"]).status == "hit"


def test_interrupted_extraction_resumes_to_identical_rows(folder, backbone, monkeypatch):
    full = run(folder, backbone, ["penultimate"])
    expected = avgpool_codes(full, remove=True)
    append = PartialCache.append

    def stop_after_two(writer, *args, **kwargs):
        if writer.n_done == 10:
            raise KeyboardInterrupt  # Ctrl-C while the third batch is written
        append(writer, *args, **kwargs)

    monkeypatch.setattr(PartialCache, "append", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(folder, backbone, ["penultimate"])
    monkeypatch.undo()
    with pytest.raises(IncompleteCacheError, match="10 of 32.*resume"):
        FeatureCache(full.path)
    resumed = run(folder, backbone, ["penultimate"])
    assert resumed.status == "resumed" and resumed.rows == 22
    assert not partial_path(full.path).exists()
    assert_same_codes(avgpool_codes(full), expected, rtol=1e-5)


def test_an_interrupted_run_for_other_data_is_started_over_and_says_so(folder, backbone, monkeypatch):
    append = PartialCache.append
    monkeypatch.setattr(PartialCache, "append", lambda writer, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if writer.n_done == 10 else append(writer, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        run(folder, backbone)
    monkeypatch.undo()
    write_image(folder / "train" / "red" / "new.png", color=(250, 0, 0))
    again = run(folder, backbone)
    assert again.status == "extracted" and again.rows == 33
    assert "an interrupted run's work was for other data or settings, so it starts over" in again.message


@pytest.mark.parametrize("options", [{"batch_size": 1}, {"batch_size": 32, "num_workers": 2}])
def test_batch_size_and_workers_give_the_same_codes(folder, backbone, tmp_path, options):
    expected = avgpool_codes(run(folder, backbone), remove=True)
    assert_same_codes(avgpool_codes(run(folder, backbone, **options)), expected)


def test_bf16_codes_stay_close_to_fp32(folder, backbone):
    a = avgpool_codes(run(folder, backbone), remove=True)
    b = avgpool_codes(run(folder, backbone, precision="bf16"))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() > 0.99


def test_the_graph_is_traced_once_per_request(folder, monkeypatch):
    """One trace for the node names, one feature extractor for the requested layers, reused by the loop."""
    calls = []
    for name in ("create_feature_extractor", "get_graph_node_names"):
        real = getattr(backbones, name)
        monkeypatch.setattr(backbones, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    result = run(folder, load_backbone("resnet18", "none"), ["penultimate", "layer2:max"])
    assert result.status == "extracted"
    assert sorted(calls) == ["create_feature_extractor", "get_graph_node_names"]


@pytest.mark.parametrize("given, said", [({"device": "cuda:1"}, "--device cuda:1"), ({"num_workers": 4}, "--workers 4")])
def test_local_only_options_with_the_ray_engine_say_so(given, said):
    from pipeline.errors import PipelineError
    from pipeline.extract import open_engine
    with pytest.raises(PipelineError, match=f"{said} is for the local engine.*leave it out with --engine ray"):
        open_engine("ray", **given)  # refused before Ray is imported or joined


def test_codes_that_are_nan_are_refused_before_they_reach_the_cache(folder, tmp_path):
    """Weights holding NaN (or fp16 overflowing) give NaN codes, on which every head fails: stage one stops,
    naming the image and the likely cause, and writes no cache."""
    model = get_model("mobilenet_v2")
    model.features[0][0].weight.data[0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(model.state_dict(), weights)
    with pytest.raises(PipelineError, match=r"^test/blue/0\.png: its avgpool codes are NaN or inf in fp32; are the "
                                            r"weights whole\?"):
        run(folder, load_backbone("mobilenet_v2", weights))
    assert not list((folder.parent.parent / "features").rglob("*.h5"))
