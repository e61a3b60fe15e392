"""device_decode.py: JPEGs decoded where the model runs (`--decode device`). The same code runs here
on the CPU (TorchCodec's or torchvision's CPU decoder) as on a GPU (nvJPEG); the CUDA tests run where
torch sees one.
Pixels and codes against the CPU path, bad files skipped with the CPU path's reasons, one bad JPEG
never failing its batch, the cache key, predict decoding as the cache did, the errors."""
import io
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.measure import cosine
from conftest import assert_same_codes, invoke, one_line_error, textured, write_image, write_jpeg
from test_codes import photos, run  # noqa: F401 (photos: a fixture)
from pipeline.backbones import load_backbone
from pipeline.codes import iter_codes
from pipeline import device_decode
from pipeline.device_decode import check_device_decoding, plain_jpeg
from pipeline.datasets import load_dataset
from pipeline.errors import PipelineError
from pipeline.extract import extract_features, open_engine
from pipeline.heads import LinearHead
from pipeline.predict import codes_of_files
from pipeline.sources import ImageFiles
from pipeline.store import FeatureCache
from pipeline.train import train_head

CPU = torch.device("cpu")
CUDA_HERE = pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA GPU; none here")


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoder(request, monkeypatch):
    """Each decoder the pipeline may use: TorchCodec's where installed, torchvision's as if it were not."""
    if request.param == "torchcodec":
        pytest.importorskip("torchcodec", reason="TorchCodec is not installed (pip install -e '.[gpu]'; make test "
                                                 "installs it)")
    else:
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    return request.param


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("mobilenet_v2", "none")


def jpeg_bytes(size=(320, 240), seed=0, mode="RGB", **options):
    out = io.BytesIO()
    textured(size, seed).convert(mode).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def turned_jpeg():
    """A JPEG whose EXIF says: turn me (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    textured((320, 240), 7).save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


@pytest.fixture
def odd_files(tmp_path):
    """Every kind of file a folder of photos holds, good and bad, in one batch's worth."""
    good = jpeg_bytes(seed=1)
    files = {"photo.jpg": good, "grey.jpg": jpeg_bytes(seed=2, mode="L"), "cmyk.jpg": jpeg_bytes(seed=3, mode="CMYK"),
             "progressive.jpg": jpeg_bytes(seed=4, progressive=True), "turned.jpg": turned_jpeg(),
             "cut.jpg": good[: len(good) // 2], "empty.jpg": b"", "text.jpg": b"not an image at all",
             "garbled.jpg": good[:400] + bytes(range(256)) * 4 + good[-2:],  # whole-looking, corrupt inside
             "tall.jpg": jpeg_bytes((240, 500), seed=5)}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    paths.append(write_image(tmp_path / "flat.png", size=(300, 200)))
    paths.append(tmp_path / "missing.jpg")
    return ImageFiles(paths)


def codes_and_failures(source, backbone, decode, batch_size=32):
    layers = backbone.resolve(["penultimate"])
    out = list(iter_codes(source, backbone, layers, np.arange(len(source)), device=CPU, precision="fp32",
                          batch_size=batch_size, num_workers=0, decode=decode))
    return (np.concatenate([codes[layers[0].name] for _, codes in out]),
            [f for batch, _ in out for f in batch.failures], [s for batch, _ in out for s in batch.sha256])


def test_plain_jpeg_is_what_the_decoder_may_take(monkeypatch):
    good = jpeg_bytes()
    assert plain_jpeg(good) and plain_jpeg(jpeg_bytes(mode="L")) and plain_jpeg(jpeg_bytes(progressive=True))
    assert not plain_jpeg(jpeg_bytes(mode="CMYK"))      # the CPU path converts it
    assert not plain_jpeg(turned_jpeg())                # the CPU path turns it
    assert not plain_jpeg(good[:-100])                  # cut short: PIL gives the reason
    assert not plain_jpeg(b"") and not plain_jpeg(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 320 * 240 - 1)
    assert not plain_jpeg(good)                         # over the decompression-bomb limit: refused on the CPU


@pytest.mark.parametrize("chunk", [32, 3])  # JPEGs per decoding call (photos of 320 x 240 and 240 x 500): the whole batch, or chunks of it
def test_bad_files_are_skipped_with_the_cpu_paths_reasons_and_good_ones_decode_alike(odd_files, backbone, chunk,
                                                                                      monkeypatch, decoder):
    monkeypatch.setattr(device_decode, "DECODE_PIXELS", chunk * 320 * 240)
    on_device, device_failures, device_sha = codes_and_failures(odd_files, backbone, "device")
    on_cpu, cpu_failures, cpu_sha = codes_and_failures(odd_files, backbone, "cpu")
    assert device_failures == cpu_failures and device_sha == cpu_sha
    assert sum(bool(f) for f in cpu_failures) == 5  # cut, empty, text, garbled, missing
    good = [k for k, f in enumerate(cpu_failures) if not f]
    similarity = cosine(on_device[good], on_cpu[good])
    other = cosine(on_cpu[good], np.roll(on_cpu[good], 1, axis=0))  # each image against the next one
    assert similarity.min() > 0.9999 and (1 - similarity).max() < 0.01 * (1 - other).min()


def test_one_bad_jpeg_does_not_fail_its_batch(tmp_path, backbone, decoder):
    good = jpeg_bytes(seed=1)
    paths = [tmp_path / f"{k}.jpg" for k in range(4)]
    for k, path in enumerate(paths):
        path.write_bytes(good[:400] + bytes(range(256)) * 4 + good[-2:] if k == 2 else jpeg_bytes(seed=k))
    _, failures, _ = codes_and_failures(ImageFiles(paths), backbone, "device", batch_size=4)
    assert [bool(f) for f in failures] == [False, False, True, False]


def test_pixels_match_the_cpu_recipe(tmp_path, backbone, decoder):
    """Full decode, resize and centre crop on tensors against PIL's one resize of the crop box."""
    from pipeline.device_decode import decoded_on, encoded_batches
    sizes = [(1024, 768), (500, 375), (1024, 768), (375, 500), (224, 224), (500, 375)]  # resized a size at a time
    paths = [write_jpeg(tmp_path / f"{k}.jpg", size, seed=k) for k, size in enumerate(sizes)]
    source = ImageFiles(paths)
    [batch] = decoded_on(CPU, encoded_batches(source, backbone.transform, np.arange(6), 6, 0), backbone.transform)
    reference = torch.stack([backbone.transform(source.load(k)[0]) for k in range(6)])
    assert batch.images.shape == reference.shape == (6, 3, 224, 224) and batch.images.dtype == torch.uint8
    difference = (batch.images.float() - reference.float()).abs()
    assert difference.max() <= 2 and difference.mean() < 0.05  # grey levels (measured: at most 1; without
    # antialiasing, 9)


def test_device_decoding_is_part_of_the_cache_key_and_predict_follows_it(photos, backbone, decoder):
    result = run(photos, backbone, decode="device")
    with h5py.File(result.path, "r") as h5:
        assert h5.attrs["decode"] == "device"
    assert run(photos, backbone, decode="device").status == "hit"
    head = LinearHead(train_head(result.path, "penultimate", "softmax")["head_file"])
    with FeatureCache(result.path) as cache:
        ids, cached = cache.ids, cache.features("avgpool")[0]
    X, _ = codes_of_files(head, ImageFiles([photos / i for i in ids]), device="cpu", batch_size=4)  # as run's
    assert_same_codes(X, cached, rtol=1e-5)  # decoded as the cache was (in its batches: test_codes): its very codes
    again = run(photos, backbone, decode="cpu")
    assert again.status == "extracted" and "decode" in again.message


def test_device_decoding_says_what_it_needs(monkeypatch):
    with pytest.raises(PipelineError, match="resize-and-crop recipe"):
        check_device_decoding(load_backbone("resnet18", "none", preprocessing="reference").transform)
    with pytest.raises(PipelineError, match="for the local engine"):
        open_engine("ray", decode="device")
    assert "for the local engine" in one_line_error(invoke("extract", "--engine", "ray", "--decode", "device"))
    with pytest.raises(PipelineError, match="unknown decode 'gpu'"):
        open_engine("local", decode="gpu")
    pytest.importorskip("torchcodec", reason="TorchCodec is not installed (make test installs it)")
    import torchcodec.decoders
    import torchvision.io

    def no_cuda_here(*args, **kwargs):
        raise RuntimeError("this build has no CUDA")
    monkeypatch.setattr(torchcodec.decoders, "decode_jpeg", no_cuda_here)  # as a build for another CUDA
    assert device_decode.jpeg_decoder(CPU)  # torchvision's decodes instead
    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_cuda_here)
    with pytest.raises(PipelineError, match="no JPEG decoder decodes on cpu .TorchCodec: this build has no CUDA; "
                                            "torchvision: this build has no CUDA.*--decode cpu"):
        check_device_decoding(load_backbone("resnet18", "none").transform)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if TorchCodec were not installed
    with pytest.raises(PipelineError, match=r"TorchCodec: not installed.*pip install -e '\.\[gpu\]'"):
        check_device_decoding(load_backbone("resnet18", "none").transform)


@CUDA_HERE
def test_nvjpeg_decodes_as_the_cpu_decoder(odd_files, backbone, decoder):
    from pipeline.device_decode import decoded_on, encoded_batches
    rows = np.arange(len(odd_files))
    [on_gpu] = decoded_on(torch.device("cuda"), encoded_batches(odd_files, backbone.transform, rows, 32, 0),
                          backbone.transform)
    [on_cpu] = decoded_on(CPU, encoded_batches(odd_files, backbone.transform, rows, 32, 0), backbone.transform)
    assert on_gpu.failures == on_cpu.failures and on_gpu.images.device.type == "cuda"
    difference = (on_gpu.images.cpu().float() - on_cpu.images.float()).abs()
    assert difference.mean() < 1.0


@CUDA_HERE
def test_a_gpu_cache_decoded_on_the_gpu_matches_one_decoded_on_the_cpu(tmp_path, decoder):
    """The whole extract on the GPU (fp32), each way of decoding: the same rows and sha256, and codes within
    cosine 0.9999 image by image, over many batches of three sizes. It does not catch the race that
    device_decode._after_queued_work prevents (on the H200 it passed without it: the race showed at
    batch 256, in make bench's vehicles figures)."""
    for k in range(192):
        write_jpeg(tmp_path / "data" / "many" / "ab"[k % 2] / f"{k}.jpg", [(640, 480), (500, 375), (375, 500)][k % 3],
                   seed=k)
    backbone = load_backbone("mobilenet_v2", "none")
    caches = {}
    for decode in ("cpu", "device"):
        result = extract_features(load_dataset("many", tmp_path / "data"), backbone, ["penultimate"],
                                  tmp_path / decode, device="cuda", precision="fp32", batch_size=16, num_workers=2,
                                  progress=False, decode=decode)
        with FeatureCache(result.path) as cache:
            caches[decode] = cache.ids, cache.sha256, cache.features(cache.layers[0])[0]
    (ids, sha, on_cpu), (device_ids, device_sha, on_device) = caches["cpu"], caches["device"]
    assert len(ids) == 192 and list(ids) == list(device_ids) and list(sha) == list(device_sha)
    assert cosine(on_cpu, on_device).min() > 0.9999


def test_sweep_decodes_on_the_device_when_asked(photos, tmp_path):
    out = invoke("sweep", "--dataset", photos.name, "--data-dir", photos.parent, "--model", "mobilenet_v3_small",
                 "--weights", "none", "--device", "cpu", "--decode", "device", "--quiet",
                 "--features-dir", tmp_path / "features", "--reports-dir", tmp_path / "reports")
    assert out.exit_code == 0, out.output
    [cache] = (tmp_path / "features" / photos.name).glob("*.h5")
    with h5py.File(cache, "r") as h5:
        assert h5.attrs["decode"] == "device"
    assert "for the local engine" in one_line_error(invoke("sweep", "--engine", "ray", "--decode", "device"))


def test_a_batch_travels_from_the_workers_as_one_tensor_of_bytes(odd_files, backbone):
    """A tensor per JPEG cost the DataLoader a shared-memory file each (on the H200, 2,358 img/s for bytes
    alone against 24,580 packed): the JPEGs of a batch come as one tensor, the rest as one of pixels."""
    from pipeline.device_decode import encoded_batches
    [batch] = encoded_batches(odd_files, backbone.transform, np.arange(len(odd_files)), 32, 1)
    encoded = batch.images
    names = [path.name for path in odd_files.paths]
    assert [names[k] for k in encoded.jpeg_at] == ["photo.jpg", "grey.jpg", "progressive.jpg", "garbled.jpg",
                                                    "tall.jpg"]  # garbled: whole-looking, refused by the decoder
    assert [bytes(data.numpy()) for data in encoded.jpegs()] == [odd_files.paths[k].read_bytes()
                                                                  for k in encoded.jpeg_at]
    assert encoded.jpeg_pixels == [320 * 240] * 4 + [240 * 500]
    assert sorted(encoded.jpeg_at + encoded.pixels_at) == list(range(len(odd_files)))
    assert encoded.pixels.shape == (len(encoded.pixels_at), 3, 224, 224)


def test_chunks_keep_to_the_pixel_budget():
    chunks = device_decode._chunks
    assert [list(c) for c in chunks([5, 5, 5, 5], 10)] == [[0, 1], [2, 3]]
    assert [list(c) for c in chunks([5, 20, 5], 10)] == [[0], [1], [2]]  # one picture over budget: alone
    assert [list(c) for c in chunks([], 10)] == [] and [list(c) for c in chunks([3], 10)] == [[0]]


def test_decoding_ahead_in_a_thread_gives_the_same_batches_and_its_errors(tmp_path, backbone, monkeypatch):
    import threading

    from pipeline.device_decode import decoded_on, encoded_batches
    paths = [write_jpeg(tmp_path / f"{k}.jpg", [(320, 240), (500, 375)][k % 2], seed=k) for k in range(10)]
    source, rows = ImageFiles(paths), np.arange(10)
    inline = list(decoded_on(CPU, encoded_batches(source, backbone.transform, rows, 3, 0), backbone.transform))
    ahead = list(decoded_on(CPU, encoded_batches(source, backbone.transform, rows, 3, 0), backbone.transform,
                            ahead=2))
    assert [list(b.rows) for b in ahead] == [list(b.rows) for b in inline] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(ahead, inline))
    threads = threading.active_count()
    batches = decoded_on(CPU, encoded_batches(source, backbone.transform, rows, 3, 0), backbone.transform, ahead=1)
    next(batches)
    batches.close()  # the caller stops early: the thread stops too
    assert threading.active_count() == threads

    def failing(*args):
        raise RuntimeError("the decoder broke")
    monkeypatch.setattr(device_decode, "_decode_batch", failing)
    with pytest.raises(RuntimeError, match="the decoder broke"):
        list(decoded_on(CPU, encoded_batches(source, backbone.transform, rows, 3, 0), backbone.transform, ahead=2))
    assert threading.active_count() == threads
