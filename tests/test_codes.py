"""codes.py: images of a source -> Batch records -> codes, one generator; and what JPEG draft
decoding changes (codes stay close to full decoding; it is in the cache key; predict decodes as
the cache did). No timing is asserted here; benchmarks/stage_one.py measures."""
import hashlib
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.measure import cosine
from conftest import assert_same_codes, write_image, write_jpeg
from pipeline.backbones import load_backbone
from pipeline.codes import Compiled, check_compiler, forward, iter_codes, stack_images, to_batch
from pipeline.errors import PipelineError
from pipeline.datasets import load_dataset
from pipeline.extract import extract_features
from pipeline.heads import LinearHead
from pipeline.predict import codes_of_files
from pipeline.sources import Batch, ImageFiles
from pipeline.store import FeatureCache
from pipeline.train import train_head


@pytest.fixture
def photos(tmp_path):
    """An ImageFolder of 1024x768 JPEGs with its own splits: 2 per class in each."""
    root = tmp_path / "data" / "photos"
    for s, split in enumerate(("train", "val", "test")):
        for k, name in enumerate(("a", "b")):
            for i in range(2):
                write_jpeg(root / split / name / f"{i}.jpg", (1024, 768), seed=100 * s + 10 * k + i)
    return root


def run(root, backbone, **options):
    """extract_features on the CPU (its codes are compared with codes made on the CPU: on a GPU machine
    `auto` made them on the GPU, which failed two tests there), in batches of 4."""
    options = {"device": "cpu", "precision": "fp32", "batch_size": 4, "num_workers": 0, "progress": False, **options}
    return extract_features(load_dataset(root.name, root.parent), backbone, ["penultimate"],
                            root.parent.parent / "features", **options)


def codes(result):
    with FeatureCache(result.path) as cache:
        return cache.features(cache.attrs["penultimate"])[0]


@pytest.fixture(scope="module")
def random_mobilenet():
    return load_backbone("mobilenet_v2", "none")


# ---------------------------------------------------------------------------
# Draft decoding: codes, the cache key, predict


def assert_close_codes(full, draft):
    """cosine > 0.99, and draft moves codes far less than going to another image does (random
    weights put any two images above 0.99)."""
    similarity = cosine(full, draft)
    other = cosine(full, np.roll(full, 1, axis=0))  # each image against the next one
    assert similarity.min() > 0.99
    assert (1 - similarity).max() < 0.1 * (1 - other).min()


def test_draft_codes_stay_close_to_full_decoding(photos, random_mobilenet):
    full = codes(run(photos, random_mobilenet, jpeg_draft=False))
    draft = codes(run(photos, random_mobilenet, jpeg_draft=True))
    assert_close_codes(full, draft)


def test_draft_is_part_of_the_cache_key(photos, random_mobilenet):
    draft = run(photos, random_mobilenet, jpeg_draft=True)
    with h5py.File(draft.path, "r") as h5:
        assert h5.attrs["decode"] == "jpeg-draft-2x"
    full = run(photos, random_mobilenet, jpeg_draft=False)
    assert full.status == "extracted" and "decode" in full.message  # the draft cache is not reused
    assert run(photos, random_mobilenet, jpeg_draft=False).status == "hit"
    again = run(photos, random_mobilenet, jpeg_draft=True)
    assert again.status == "extracted" and "decode" in again.message  # nor the full one for draft


def test_caches_from_before_the_decode_key_count_as_full_decoding(photos, random_mobilenet):
    import json
    result = run(photos, random_mobilenet, jpeg_draft=False)
    with h5py.File(result.path, "r+") as h5:  # as written before `decode` was recorded
        settings = json.loads(h5.attrs["settings"])
        del settings["decode"]
        h5.attrs["settings"] = json.dumps(settings)
    assert run(photos, random_mobilenet, jpeg_draft=False).status == "hit"
    assert run(photos, random_mobilenet, jpeg_draft=True).status == "extracted"


def test_predict_decodes_as_the_cache_did(photos, random_mobilenet):
    """A head trained on a fully decoded cache gets fully decoded codes for new files, and a draft
    cache's head draft-decoded ones: the codes of each cache, not merely close to them."""
    for draft in (False, True):
        result = run(photos, random_mobilenet, jpeg_draft=draft)
        head = LinearHead(train_head(result.path, "penultimate", "softmax")["head_file"])
        with FeatureCache(result.path) as cache:
            ids, cached = cache.ids, cache.features("avgpool")[0]
        X, _ = codes_of_files(head, ImageFiles([photos / i for i in ids]), device="cpu", batch_size=4)  # as run's
        assert_same_codes(X, cached)


# ---------------------------------------------------------------------------
# The forward loop


class MeanColour(torch.nn.Module):
    def forward(self, images):
        return {"mean": images.mean(dim=(2, 3))}  # [B, 3]


def batches_of(*sizes, value=None):
    """Batch records of `sizes` rows each, numbered on; pixels all k (or `value`) in the k-th batch."""
    first = np.cumsum((0,) + sizes)
    return [Batch(np.arange(first[k], first[k] + n), torch.full((n, 3, 4, 4), float(k if value is None else value)),
                  [""] * n, [""] * n) for k, n in enumerate(sizes)]


def test_a_batch_of_the_fast_recipe_is_collated_channels_last_with_the_same_pixels():
    """The fast recipe gives views of HWC pixels: they stack straight into the model's layout."""
    from PIL import Image

    transform = load_backbone("resnet18", "none").transform
    rng = np.random.default_rng(0)
    images = [transform(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))) for _ in range(3)]
    images.append(torch.zeros_like(images[0]))  # the blank an undecodable image runs as
    batch = to_batch([(k, image, "", "") for k, image in enumerate(images)])
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.images.shape == (4, 3, 224, 224) and torch.equal(batch.images, torch.stack(images))
    chw = [torch.rand(3, 8, 8) for _ in range(2)]  # a transform of its own (contiguous CHW): stacked as is
    assert stack_images(chw).is_contiguous() and torch.equal(stack_images(chw), torch.stack(chw))


def test_batches_from_decoding_processes_keep_the_channels_last_layout(tmp_path):
    """A batch crosses from a worker process in shared memory: its strides must survive the trip."""
    from pipeline.codes import image_batches
    files = [write_image(tmp_path / f"{k}.png", size=(300 + k, 240)) for k in range(4)]
    transform = load_backbone("resnet18", "none").transform
    [batch] = image_batches(ImageFiles(files), transform, np.arange(4), torch.device("cpu"), 4, num_workers=2)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch.images, torch.stack([transform(ImageFiles(files).load(k)[0]) for k in range(4)]))


def test_decoding_threads_are_kept_from_batch_to_batch_and_left_out_of_a_copy(tmp_path):
    """Between forward passes one thread per core decodes a batch; the same threads decode the next one,
    and a copy of the rows (a worker process's) starts without them."""
    import copy
    from pipeline.codes import SourceRows
    files = [write_image(tmp_path / f"{k}.png", size=(300 + k, 240)) for k in range(6)]
    transform = load_backbone("resnet18", "none").transform
    rows = SourceRows(ImageFiles(files), transform, np.arange(6), threads=2)
    first = rows.__getitems__([0, 1, 2])
    pool = rows._pool
    later = rows.__getitems__([3, 4, 5])
    assert pool is not None and rows._pool is pool and copy.copy(rows)._pool is None
    assert [item[0] for item in first + later] == list(range(6))
    assert all(torch.equal(item[1], transform(ImageFiles(files).load(k)[0])) for k, item in enumerate(first + later))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])  # every conv folded; bare convs and a Linear
def test_weights_cast_once_give_autocasts_codes_and_leave_the_backbone_alone(name):
    from pipeline.codes import prepare_model
    backbone = load_backbone(name, "none")
    [layer] = backbone.resolve(["penultimate"])
    before = {key: value.clone() for key, value in backbone.model.state_dict().items()}
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    cpu = torch.device("cpu")
    cast = prepare_model(backbone.extractor([layer]), cpu, precision="bf16")
    assert {p.dtype for m in cast.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()} == {
        torch.bfloat16}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = cast(images)[layer.name]
        expected = prepare_model(backbone.extractor([layer]), cpu)(images)[layer.name]  # autocast casts per call
    assert torch.equal(got, expected)
    assert all(torch.equal(backbone.model.state_dict()[key], value) for key, value in before.items())
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}


def test_forward_yields_every_batch_in_order_with_its_codes():
    out = list(forward(MeanColour(), batches_of(3, 5, 2), torch.device("cpu"), "fp32"))
    assert [list(batch.rows) for batch, _ in out] == [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9]]
    assert [len(codes["mean"]) for _, codes in out] == [3, 5, 2]
    assert [float(codes["mean"][0, 0]) for _, codes in out] == [0.0, 1.0, 2.0]
    assert all(codes["mean"].dtype == np.float32 and batch.images is None for batch, codes in out)
    assert list(forward(MeanColour(), [], torch.device("cpu"), "fp32")) == []


def test_forward_says_how_long_it_waited_for_each_batch():
    import time

    def slow(batches, seconds):  # decoders that hand each batch over `seconds` late
        for batch in batches:
            time.sleep(seconds)
            yield batch
    out = list(forward(MeanColour(), slow(batches_of(3, 5, 2), 0.05), torch.device("cpu"), "fp32"))
    assert [batch.waited_s >= 0.05 for batch, _ in out] == [True] * 3
    quick = list(forward(MeanColour(), batches_of(3, 5, 2), torch.device("cpu"), "fp32"))
    assert all(0 < batch.waited_s < 0.05 for batch, _ in quick)


def test_forward_leaves_no_autocast_or_inference_mode_behind():
    for _ in forward(MeanColour(), batches_of(2, 2, value=1), torch.device("cpu"), "bf16"):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_inference_mode_enabled()


def test_iter_codes_carries_each_row_with_its_hash_and_failure(tmp_path, random_mobilenet):
    files = [write_image(tmp_path / f"{i}.png", size=(20 + i, 20)) for i in range(5)]
    (tmp_path / "2.png").write_bytes(b"")
    [layer] = random_mobilenet.resolve(["penultimate"])
    pairs = list(iter_codes(ImageFiles(files), random_mobilenet, [layer], np.array([4, 0, 2, 3]),
                            device=torch.device("cpu"), precision="fp32", batch_size=3, num_workers=0))
    assert [list(batch.rows) for batch, _ in pairs] == [[4, 0, 2], [3]]
    batch = pairs[0][0]
    assert batch.failures == ["", "", "empty file (0 bytes)"] and batch.sha256[2] == ""
    assert batch.sha256[0] == hashlib.sha256(files[4].read_bytes()).hexdigest()
    assert pairs[0][1]["avgpool"].shape == (3, 1280)


# ---------------------------------------------------------------------------
# torch.compile (--compile)

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                                    reason="torch.compile on a CPU builds C++: no g++ or clang++ here")


class SmallNet(nn.Module):
    """Convolution, BatchNorm, ReLU, then two codes: a model for compiling in seconds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()

    def forward(self, images):
        maps = self.body(images)
        return {"avg": maps.mean(dim=(2, 3)), "max": maps.amax(dim=(2, 3))}


@needs_compiler
def test_compiled_gives_the_models_codes_and_compiles_once(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # a padded batch must not recompile
    model = SmallNet()
    compiled = Compiled(model, batch_size=4)
    for count in (4, 3, 1, 4):  # the smaller ones padded to 4, their codes cut back
        images = torch.rand(count, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            got, want = compiled(images), model(images)
        assert set(got) == {"avg", "max"}
        for name in want:
            assert got[name].shape == (count, 8)
            assert torch.allclose(got[name], want[name], atol=1e-5), name


def test_a_failed_compile_says_how_to_go_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler\n(more lines)")
    monkeypatch.setattr(torch, "compile", lambda model, **options: broken)
    with pytest.raises(PipelineError, match="torch.compile failed on the first batch: InductorError: no working C.. "
                                            "compiler .more lines.; leave --compile out"):
        Compiled(SmallNet(), 2)(torch.rand(2, 3, 16, 16))


def test_compile_on_a_cpu_without_a_compiler_is_refused_at_once(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(PipelineError, match=r"needs a C\+\+ compiler.*\(apt install g\+\+\), or leave --compile out"):
        check_compiler(torch.device("cpu"))
    check_compiler(torch.device("cuda"))  # a GPU's kernels come from Triton, not from here


@needs_compiler
def test_extract_compiled_gives_the_same_cache_as_eager(photos):
    backbone = load_backbone("resnet18", "none")
    eager = run(photos, backbone, batch_size=5)  # 12 images: the last batch of 2 is padded when compiled
    eager_codes = codes(eager)
    with FeatureCache(eager.path) as cache:
        assert not cache.attrs["compiled"]
    compiled = run(photos, backbone, batch_size=5, compiled=True, rebuild=True)
    assert compiled.status == "extracted" and compiled.path == eager.path  # not part of the key: the same file
    assert cosine(eager_codes, codes(compiled)).min() > 0.9999
    with FeatureCache(compiled.path) as cache:
        assert cache.attrs["compiled"]
