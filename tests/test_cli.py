"""The CLI: thin commands, one-line errors that say what to do, never a traceback."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import image_folder, invoke, one_line_error, write_image
from pipeline.errors import PipelineWarning

DARK_LIGHT = {"dark": (30, 30, 30), "light": (230, 230, 230)}


def shapes(tmp_path):
    """An ImageFolder with split folders: dark and light images of different sizes."""
    return image_folder(tmp_path / "data" / "shapes", DARK_LIGHT, size=lambda i: (20 + i, 20))


def test_bad_input_gives_one_line_errors(tmp_path):
    assert "did you mean resnet50" in one_line_error(invoke("extract", "--dataset", "digits", "--model", "resnet5O"))
    assert "DATA_DIR" in one_line_error(invoke("extract", "--dataset", "nope", "--data-dir", tmp_path))
    message = one_line_error(invoke("train-head", "--dataset", "nope", "--features-dir", tmp_path))
    assert "make extract DATASET=nope" in message
    message = one_line_error(invoke("extract", "--dataset", "digits", "--model", "resnet18",
                                    "--weights", tmp_path / "missing.pth", "--data-dir", tmp_path))
    assert "missing.pth not found" in message
    shapes(tmp_path)
    message = one_line_error(invoke("extract", "--dataset", "shapes", "--model", "resnet18", "--weights", "none",
                                    "--layers", "layer4:max,avgpool:max", "--data-dir", tmp_path / "data",
                                    "--features-dir", tmp_path))
    assert "layer 'avgpool:max': avgpool of resnet18 is a vector already" in message and "ask for avgpool" in message
    assert not list(tmp_path.rglob("*.h5*"))  # refused before any work
    for command in (("extract", "--dataset", "nope"), ("sweep", "--dataset", "nope"), ("predict", "x.h5", "y")):
        message = one_line_error(invoke(*command, "--engine", "ray", "--device", "cuda"))  # before any loading
        assert "--device cuda is for the local engine" in message
        message = one_line_error(invoke(*command, "--engine", "ray", "--compile"))
        assert "--compile is for the local engine" in message


def test_a_dataset_is_a_folder_name_not_a_path(tmp_path):
    for command in ("extract", "train-head", "sweep"):
        message = one_line_error(invoke(command, "--dataset", tmp_path / "data" / "pabs"))
        assert f"give DATA_DIR={tmp_path / 'data'} DATASET=pabs" in message
    assert "give DATA_DIR=<DATA_DIR>/bad DATASET=strlab" in one_line_error(invoke("extract", "--dataset", "bad/strlab"))
    shapes(tmp_path)
    options = ("--model", "resnet18", "--weights", "none", "--data-dir", tmp_path / "data", "--features-dir",
               tmp_path / "features", "--quiet")
    assert invoke("extract", "--dataset", "shapes", *options).exit_code == 0
    again = invoke("extract", "--dataset", "shapes/", *options)  # the same data set, the same cache
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_pipeline_warnings_print_as_one_line_and_others_as_python_prints_them():
    from pipeline.cli import _warning_line
    from pipeline.errors import PipelineWarning

    assert _warning_line(PipelineWarning("slow here; use X"), PipelineWarning, "x.py", 3) == "warning: slow here; use X\n"
    assert "x.py:3: UserWarning: other" in _warning_line(UserWarning("other"), UserWarning, "x.py", 3)


@pytest.mark.parametrize("command", ["train-head", "sweep"])
def test_heads_threads_sleep_between_steps_unless_the_user_said(tmp_path, monkeypatch, command):
    """Set before torch loads in a fresh process; here the variable itself is what is checked."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    invoke(command, "--dataset", "nope", "--data-dir", tmp_path, "--features-dir", tmp_path)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    invoke(command, "--dataset", "nope", "--data-dir", tmp_path, "--features-dir", tmp_path)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    invoke("extract", "--dataset", "nope", "--data-dir", tmp_path, "--features-dir", tmp_path)
    assert "OMP_WAIT_POLICY" not in os.environ  # stage one keeps torch's default


def test_taps_and_models_list():
    out = invoke("taps", "resnet50").output
    assert "layer3" in out and "[1024, 14, 14]" in out and "penultimate" in out
    assert "resnet50" in invoke("models", "resnet*").output.split()
    assert "no torchvision classification model matches 'zzz*'" in one_line_error(invoke("models", "zzz*"))
    assert "pooled sizes" not in invoke("taps", "--help").output
    assert "path,label,score,skipped" in invoke("predict", "--help").output


def test_train_head_weights_alone_choose_the_cache_or_name_those_there(tmp_path):
    for name in ("resnet18-random.h5", "mobilenet_v2-random.h5", "mobilenet_v2-IMAGENET1K_V1.h5"):
        (tmp_path / "shapes").mkdir(exist_ok=True)
        (tmp_path / "shapes" / name).write_bytes(b"")  # found by name only: never read
    train = ("train-head", "--dataset", "shapes", "--features-dir", tmp_path)
    message = one_line_error(invoke(*train, "--weights", "none"))
    assert "2 models have caches of shapes made with WEIGHTS=none (mobilenet_v2-random.h5, resnet18-random.h5); " \
           "give MODEL= too" in message
    message = one_line_error(invoke(*train, "--weights", "default"))  # mobilenet_v2's default is IMAGENET1K_V2
    assert "no feature cache made with WEIGHTS=default (caches there: mobilenet_v2-IMAGENET1K_V1.h5, " \
           "mobilenet_v2-random.h5, resnet18-random.h5); run `make extract DATASET=shapes MODEL=<model> " \
           "WEIGHTS=default` first" in message
    message = one_line_error(invoke(*train, "--model", "resnet18", "--weights", "default"))
    assert "resnet18-IMAGENET1K_V1.h5: no such feature cache" in message
    assert "make extract DATASET=shapes MODEL=resnet18 WEIGHTS=default" in message
    assert "moved.pth not found" in one_line_error(invoke(*train, "--weights", tmp_path / "moved.pth"))


@pytest.mark.skipif(not shutil.which("make"), reason="no make")
def test_make_forwards_weights_batch_and_pooling():
    def command(*args):
        run = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=Path(__file__).parents[1],
                             capture_output=True, text=True, check=True)
        return run.stdout  # the commands make would run, not run
    predict = command("predict", "HEAD_FILE=h.h5", "INPUTS=x", "WEIGHTS=/moved/w.pth", "BATCH=8")
    assert "--weights /moved/w.pth" in predict and "--batch-size 8" in predict
    assert "--weights" not in command("predict", "HEAD_FILE=h.h5", "INPUTS=x")
    assert "--pooling max" in command("sweep", "POOLING=max") and "--pooling" not in command("sweep")
    with pytest.raises(subprocess.CalledProcessError) as refused:
        command("predict", "INPUTS=photos/")  # the folder would be taken for the head file
    assert "make predict needs HEAD_FILE=" in refused.value.stderr


def test_extract_train_report_predict(tmp_path):
    data = shapes(tmp_path)
    common = ("--data-dir", tmp_path / "data", "--features-dir", tmp_path / "features")
    result = invoke("extract", "--dataset", "shapes", "--model", "resnet18", "--weights", "none",
                    "--layers", "penultimate,layer2:max", "--precision", "fp32", "--workers", "0", "--quiet", *common)
    assert result.exit_code == 0 and "extracted 24 images" in result.output and "layer2:max" in result.output
    again = invoke("extract", "--dataset", "shapes", "--model", "resnet18", "--weights", "none", "--precision", "fp32",
                   "--quiet", *common)
    assert "nothing to do" in again.output
    trained = invoke("train-head", "--head", "svm", "--dataset", "shapes", "--layer", "layer2:max", *common)
    assert trained.exit_code == 0 and "svm on layer2:max" in trained.output
    bare = one_line_error(invoke("train-head", "--head", "svm", "--dataset", "shapes", "--layer", "layer2", *common))
    assert "(a tap alone means layer2:avg); it has layer2:max: give LAYER=layer2:max" in bare
    named = invoke("train-head", "--head", "softmax", "--dataset", "shapes", "--model", "resnet18", "--weights", "none",
                   "--memory-budget", "1K", *common)
    assert named.exit_code == 0 and "resnet18-random.avgpool.softmax.h5" in named.output
    assert "minibatch Adam streamed from the cache" in named.output  # 24 x 512 codes are over 1 KiB
    exact = invoke("train-head", "--head", "softmax", "--dataset", "shapes", "--solver", "sklearn", *common)
    assert exact.exit_code == 0 and "solver: scikit-learn LogisticRegression" in exact.output
    assert "is not a size" in invoke("train-head", "--memory-budget", "lots", *common).output
    other = invoke("train-head", "--dataset", "shapes", "--model", "resnet18", "--weights", "default", *common)
    assert "resnet18-IMAGENET1K_V1.h5: no such feature cache" in one_line_error(other)
    newer = tmp_path / "features" / "shapes" / "mobilenet_v2-IMAGENET1K_V2.h5"
    newer.write_bytes(b"")  # the newest cache, of other weights: WEIGHTS alone must not take it
    chosen = invoke("train-head", "--dataset", "shapes", "--weights", "none", *common)
    assert chosen.exit_code == 0 and "resnet18-random.avgpool.softmax.h5" in chosen.output, chosen.output
    assert "(the cache made with WEIGHTS=none)" in chosen.output
    newer.unlink()
    missing = one_line_error(invoke("train-head", "--dataset", "shapes", "--layer", "auto", *common))
    assert "make sweep HEAD=softmax" in missing
    report = invoke("report", "--features-dir", tmp_path / "features", "--reports-dir", tmp_path / "reports")
    assert report.exit_code == 0 and "random (untrained)" in report.output and "(stale)" not in report.output
    assert (tmp_path / "reports" / "runs.json").exists()
    extract = ("extract", "--dataset", "shapes", "--model", "resnet18", "--weights", "none", "--precision", "fp32",
               "--workers", "0", "--quiet", *common)
    invoke(*extract, "--rebuild")  # the same data and codes: its heads stand
    report = invoke("report", "--features-dir", tmp_path / "features", "--reports-dir", tmp_path / "reports")
    assert report.exit_code == 0 and "(stale)" not in report.output
    write_image(data / "train" / "dark" / "extra.png", color=(20, 20, 20))
    invoke(*extract, "--update")  # one image more: its heads scored another data set
    report = invoke("report", "--features-dir", tmp_path / "features", "--reports-dir", tmp_path / "reports")
    assert report.output.count("(stale)") == 2 and "was made again, of other data, splits or codes" in report.output
    head = next((tmp_path / "features" / "shapes" / "heads").glob("*.h5"))
    predicted = invoke("predict", head, data / "test", "--out", tmp_path / "p.csv", "--device", "cpu")
    assert predicted.exit_code == 0 and len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 6


def test_changed_data_stops_and_says_what_to_do(tmp_path):
    data = shapes(tmp_path)
    extract = ("extract", "--dataset", "shapes", "--model", "resnet18", "--weights", "none", "--precision", "fp32",
               "--workers", "0", "--quiet", "--data-dir", tmp_path / "data", "--features-dir", tmp_path / "features")
    assert invoke(*extract).exit_code == 0
    write_image(data / "train" / "dark" / "new.png", size=(25, 21), color=(10, 10, 10))
    (data / "train" / "light" / "cut.png").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    message = one_line_error(invoke(*extract))
    assert "2 new (first: train/dark/new.png)" in message and "--update" in message and "--rebuild" in message
    updated = invoke(*extract, "--update")
    assert updated.exit_code == 0 and "updating" in updated.output and "updated 1 images" in updated.output
    assert "1 image skipped" in updated.output
    both = invoke(*extract, "--update", "--rebuild")
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_predict_lists_unreadable_files_with_the_reason(tmp_path):
    shapes(tmp_path)
    common = ("--data-dir", tmp_path / "data", "--features-dir", tmp_path / "features")
    invoke("extract", "--dataset", "shapes", "--model", "resnet18", "--weights", "none", "--precision", "fp32",
           "--workers", "0", "--quiet", *common)
    assert invoke("train-head", "--head", "softmax", "--dataset", "shapes", *common).exit_code == 0
    photos = tmp_path / "photos"
    write_image(photos / "a.png", color=(30, 30, 30))
    (photos / "b.png").write_bytes(b"")
    (photos / "c.png").symlink_to(tmp_path / "gone.png")  # a broken link: a row with its reason too
    head = next((tmp_path / "features" / "shapes" / "heads").glob("*.h5"))
    with pytest.warns(PipelineWarning, match=r"with random weights \(WEIGHTS=none\): its labels test the pipeline"):
        predicted = invoke("predict", head, photos, "--out", tmp_path / "p.csv", "--device", "cpu")
    assert predicted.exit_code == 0 and "classified 1 image ->" in predicted.output and "2 skipped" in predicted.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "path,label,score,skipped"
    assert lines[2] == f"{photos / 'b.png'},,,empty file (0 bytes)"
    assert lines[3].startswith(f"{photos / 'c.png'},,,") and len(lines) == 4
    assert "is a folder; give a file to write" in one_line_error(invoke("predict", head, photos, "--out", tmp_path))
    message = one_line_error(invoke("predict", head, photos, "--out", tmp_path / "p.csv" / "q.csv"))
    assert message.startswith(f"Error: cannot write {tmp_path / 'p.csv' / 'q.csv'}")
    assert (tmp_path / "p.csv").read_text().splitlines() == lines and not list(tmp_path.glob("*.partial"))
