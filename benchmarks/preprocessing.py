"""What preprocessing and start-up cost, and what the fast preprocessing changes (stage_one.py reports it).

    steps = step_costs(table, backbone)          # ms per image of each step, one thread
    on_device = device_step_costs(table, "resnet50", device)  # --decode device: the steps where the model runs
    fidelity = fast_fidelity(table, "resnet50")  # cosine of codes: fast against torchvision's recipe
    startup = fresh_startup_costs("resnet50", "none", batch.shape, device, "bf16")  # paid once per run
"""
import time

import numpy as np
import torch

from pipeline.backbones import load_backbone
from pipeline.codes import prepare_model, stack_images
from pipeline.hardware import autocast_for, collector_skips_existing
from pipeline.images import decode_image, read_image_bytes
from pipeline.plan import draft_size

from measure import in_fresh_process

STEP_IMAGES = 64


def _per_image_ms(function, items):
    t0 = time.perf_counter()
    out = [function(item) for item in items]
    return (time.perf_counter() - t0) / len(items) * 1e3, out


def step_costs(table, model="resnet50", images=STEP_IMAGES):
    """ms per image, on one thread, of each step of torchvision's recipe and of the fast one."""
    import torchvision.transforms.functional as F

    reference = load_backbone(model, "none", preprocessing="reference").transform
    fast = load_backbone(model, "none").transform
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = [table.file(i) for i in range(min(images, len(table)))]
        ms, data = _per_image_ms(read_image_bytes, files)
        costs = {"read": ms}
        costs["decode"], pictures = _per_image_ms(lambda d: decode_image(d, draft_size(reference)), data)
        costs["resize"], resized = _per_image_ms(
            lambda p: F.resize(p, reference.resize_size, interpolation=reference.interpolation), pictures)
        costs["crop"], cropped = _per_image_ms(lambda p: F.center_crop(p, reference.crop_size), resized)
        costs["to_tensor"], tensors = _per_image_ms(
            lambda p: F.convert_image_dtype(F.pil_to_tensor(p), torch.float), cropped)
        costs["normalise"], _ = _per_image_ms(lambda t: F.normalize(t, reference.mean, reference.std), tensors)
        costs["fast_resize_crop_to_uint8"], small = _per_image_ms(fast, pictures)
        t0 = time.perf_counter()
        batch = stack_images(small)  # [B, 3, H, W] channels_last, as the DataLoader collates a batch
        costs["fast_collate_per_batch"] = (time.perf_counter() - t0) / len(small) * 1e3
        t0 = time.perf_counter()
        fast.normalizer()(batch)
        costs["fast_normalise_per_batch"] = (time.perf_counter() - t0) / len(small) * 1e3
    finally:
        torch.set_num_threads(before)
    costs["reference_total"] = sum(costs[k] for k in ("decode", "resize", "crop", "to_tensor", "normalise"))
    costs["fast_total"] = costs["decode"] + sum(costs[k] for k in ("fast_resize_crop_to_uint8", "fast_collate_per_batch",
                                                                   "fast_normalise_per_batch"))
    return {key: round(value, 3) for key, value in costs.items()}


def device_step_costs(table, model, device, images=256):
    """ms per JPEG of `--decode device`'s steps where the model runs, for the first `images` rows in one
    batch (as a batch of 256 reaches them on a GPU): the decoder's call alone, and decoding with the resize
    and crop (device_decode.decoded_on). Best of three, after a first call that sets the decoder up."""
    from dataclasses import replace

    from pipeline.device_decode import decoded_on, encoded_batches, jpeg_decoder

    transform = load_backbone(model, "none").transform
    [batch] = encoded_batches(table, transform, np.arange(min(images, len(table))), images, 0)
    jpegs, decode = list(batch.images.jpegs()), jpeg_decoder(device)

    def best_ms(step):
        times = []
        for _ in range(4):  # the first sets the decoder up: not counted
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # each timing holds its own work, and only its own
            times.append(time.perf_counter() - t0)
        times = times[1:]
        return round(min(times) / max(len(jpegs), 1) * 1e3, 4)

    def decode_resize_crop():  # on a copy: decoded_on fills the batch's images, failures and sha256 in
        fresh = replace(batch, sha256=list(batch.sha256), failures=list(batch.failures))
        return next(decoded_on(device, iter([fresh]), transform, ahead=0))
    return {"jpegs": len(jpegs), "decode": best_ms(lambda: decode(jpegs)), "decode_resize_crop": best_ms(decode_resize_crop)}


def fast_fidelity(table, model, device, precision, images=128):
    """Cosine of the penultimate codes of the first `images` rows, fast preprocessing against torchvision's."""
    codes = {}
    for preprocessing in ("reference", "fast"):
        backbone = load_backbone(model, "none", preprocessing=preprocessing)
        [layer] = backbone.resolve(["penultimate"])
        extractor = prepare_model(backbone.extractor([layer]), device, precision=precision)
        out = []
        with torch.inference_mode(), autocast_for(device, precision):
            for lo in range(0, min(images, len(table)), 32):
                batch = [backbone.transform(table.load(i, draft_size(backbone.transform))[0])
                         for i in range(lo, min(images, len(table), lo + 32))]
                out.append(extractor(torch.stack(batch).to(device))[layer.name].float().cpu().numpy())
        codes[preprocessing] = np.concatenate(out)
    a, b = codes["reference"].astype(np.float64), codes["fast"].astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"fast_cosine_mean": round(float(cosine.mean()), 6), "fast_cosine_min": round(float(cosine.min()), 6),
            "fast_cosine_images": len(cosine)}


def fresh_startup_costs(model, weights, shape, device, precision, compiled=False):
    """startup_costs as a run pays them, in a new process: in one that has traced and folded a model
    before, tracing, folding and the first batch cost a fraction of that (the README has both)."""
    return in_fresh_process("preprocessing", "child_startup_costs", model=model, weights=str(weights),
                            shape=list(shape), device=str(device), precision=precision, compiled=compiled)


def child_startup_costs(model, weights, shape, device, precision, compiled):
    device = torch.device(device)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = pixels.to(device, memory_format=torch.channels_last)  # [B, 3, H, W], as the loop gives it
    return startup_costs(model, weights, batch, device, precision, compiled)


def startup_costs(model, weights, batch, device, precision, compiled=False):
    """Seconds a run pays once: building the backbone, tracing its graph for the layer, preparing the
    extractor (BatchNorm folded, moved), its first batch (`compiled`: compiling it); and a later batch,
    for scale."""
    t0 = time.perf_counter()
    backbone = load_backbone(model, weights)
    built = time.perf_counter()
    with collector_skips_existing():  # as extract_features runs it
        [layer] = backbone.resolve(["penultimate"])
        extractor = backbone.extractor([layer])
        traced = time.perf_counter()
        extractor = prepare_model(extractor, device, len(batch) if compiled else None, precision)
        prepared = time.perf_counter()
        times = []
        with torch.inference_mode(), autocast_for(device, precision):
            for _ in range(3):
                t1 = time.perf_counter()
                extractor(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t1)
    return {"startup_build_s": round(built - t0, 3), "startup_trace_s": round(traced - built, 3),
            "startup_prepare_s": round(prepared - traced, 3), "startup_first_batch_s": round(times[0], 3),
            "steady_batch_s": round(min(times[1:]), 3)}
