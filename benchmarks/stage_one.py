"""Stage-one speed: the pipeline against the forward-pass ceiling and the tutorial loop.

    python benchmarks/stage_one.py                            # resnet50, the defaults (`make bench`)
    python benchmarks/stage_one.py --model resnet18 --images 64 --no-accuracy
    python benchmarks/stage_one.py --device cuda --large-factor 100   # a GPU: 38,400 images in the long run

One run, one model, the same images throughout: a corpus made from the vehicles JPEGs upscaled to photo
sizes (half 500x375, half 1024x768, quality 90), an ImageFolder kept under bench/corpus/ between runs.

    ceiling   the Extractor alone on batches already in memory, prepared as the loop prepares it (BatchNorm
              folded, channels_last), at its precision and batch size (warm-up excluded; the batches timed
              again until MIN_TIMED_BATCHES ran); measured before, between and after the pipeline runs
    pipeline  extract_features in a fresh process, image files to a finished HDF5 cache, twice; the ratio
              is the mean pipeline rate over the mean ceiling (drift on a shared machine hits both)
    baseline  the tutorial loop: ImageFolder + DataLoader(batch 4, 4 workers), fp32,
              no_grad, Resize/CenterCrop/ToTensor/Normalize, features in a list of arrays,
              in a fresh process, first and again after the long run; the ratio is the mean
              pipeline rate over their mean
    long run  the same on N x --large-factor images (10 N; the same files hard-linked under
              other names), against the ceilings just before and after it
    memory    peak RSS of that fresh `extract` process on N images and on the long run's
    bf16      cosine of bf16 to fp32 codes on the bench images, and (with the real MobileNetV2 weights
              in --shared) vehicles softmax test accuracy of an fp32 cache against a bf16 cache (and,
              with --decode device, one decoded on the device); by default where bf16 runs natively

Prints a table and writes REPORTS_DIR/bench.json. A script, not a test: no figure here is asserted.
"""
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.backbones import load_backbone
from pipeline.codes import image_batches, prepare_model
from pipeline.datasets import load_dataset
from pipeline.errors import PipelineError
from pipeline.extract import extract_features
from pipeline.hardware import (autocast_for, default_batch_size, default_workers, resolve_device,
                               resolve_precision)
from pipeline.plan import draft_size
from pipeline.store import FeatureCache
from pipeline.train import train_head

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, whether run as a script or imported
import corpus  # noqa: E402
from corpus import make_corpus, repeat_corpus  # noqa: E402
from measure import MOBILENET_WEIGHTS, cosine, cpu_times, cpu_use, in_fresh_process, machine, peak_rss_mb  # noqa: E402
from preprocessing import device_step_costs, fast_fidelity, fresh_startup_costs, step_costs  # noqa: E402
from tutorial_loop import fresh_baseline  # noqa: E402
from stage_one_table import (bf16_figures, forward_shares, memory_figures, speed_figures, table_text,  # noqa: E402
                              targets)

IMAGES = 384                       # default N: start-up (~1.3 s) stays under a tenth of the run
LARGE_FACTOR = 10                  # the long run and the memory run: 10 N images
MIN_TIMED_BATCHES = 8              # the ceiling times at least this many batches (a GPU's 256-image batches)
PIPELINE_RUNS = 2                  # pipeline runs, each between two ceiling measurements
COSINE_IMAGES = 128                # codes compared at both precisions (the other one may be slow)


# ---------------------------------------------------------------------------
# The measurements


def ceiling(backbone, table, device, precision, batch_size, workers, compiled=False):
    """Forward-only rate of the pipeline's Extractor, prepared as the loop prepares it (`compiled`: through
    torch.compile, compiled in the warm-up), on batches already in memory -> (img/s, codes [N, D], the
    batches, the model: forward_rate measures again)."""
    [layer] = backbone.resolve(["penultimate"])
    loader = image_batches(table, backbone.transform, np.arange(len(table)), device, batch_size, workers,
                           draft_size(backbone.transform))
    batches = [batch.images.to(device, memory_format=torch.channels_last) for batch in loader]  # [B, 3, H, W]
    model = prepare_model(backbone.extractor([layer]), device, batch_size if compiled else None, precision)
    rate, codes = forward_rate(model, batches, device, precision)
    return rate, codes[layer.name], batches, model


def forward_rate(model, batches, device, precision, warmup=1):
    """img/s of `model` over `batches` (run again until MIN_TIMED_BATCHES ran) after `warmup` batches,
    and its codes of `batches` {name: [N, D]}."""
    rounds = -(-MIN_TIMED_BATCHES // len(batches))
    outputs = []
    with torch.inference_mode(), autocast_for(device, precision):
        for images in batches[:warmup]:
            model(images)
        _sync(device)
        t0 = time.perf_counter()
        for k in range(rounds):
            for images in batches:
                out = model(images)
                if k == 0:
                    outputs.append(out)
        _sync(device)
        seconds = time.perf_counter() - t0
    codes = {name: np.concatenate([out[name].float().cpu().numpy() for out in outputs]) for name in outputs[0]}
    return rounds * sum(len(b) for b in batches) / seconds, codes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_cosine(backbone, batches, codes, device, precision):
    """Cosine of bf16 to fp32 codes on the first COSINE_IMAGES bench images (the ceiling gave those
    at the pipeline's precision) -> (cosine per image, images compared)."""
    [layer] = backbone.resolve(["penultimate"])
    model = prepare_model(backbone.extractor([layer]), device)
    subset, count = [], 0
    for images in batches:
        if count >= COSINE_IMAGES:
            break
        subset.append(images[:COSINE_IMAGES - count])
        count += len(subset[-1])
    have = {precision: codes[:count]}
    for other in ("fp32", "bf16"):
        if other not in have:
            have[other] = forward_rate(model, subset, device, other, warmup=0)[1][layer.name]
    return cosine(have["fp32"], have["bf16"]), count


def child_extract(data_dir, name, model, weights, features_dir, device, precision, batch_size, workers,
                  engine="local", ray_address=None, decode="cpu", compiled=False):
    """One `extract` as a user runs it (called in a fresh process) -> its rate and peak RSS."""
    table = load_dataset(name, data_dir)
    backbone = load_backbone(model, weights)
    before, t0 = cpu_times(), time.perf_counter()
    result = extract_features(table, backbone, ["penultimate"], features_dir, device=device, precision=precision,
                              batch_size=batch_size, num_workers=workers, progress=False, engine=engine,
                              ray_address=ray_address, decode=decode, compiled=compiled)
    seconds = time.perf_counter() - t0
    return {"images": len(table), "seconds": seconds, "images_per_s": len(table) / seconds,
            "inner_images_per_s": result.images_per_s, "maxrss_mb": peak_rss_mb(),
            "waited_share": round(result.waited_s / result.seconds, 4) if result.waited_s else None,  # Ray: None
            **cpu_use(before, cpu_times(), len(table))}


def fresh_extract(root, model, *, weights, device, precision, batch_size, workers, work, decode="cpu",
                  compiled=False, sample_memory=False):
    """child_extract in a new process, cache removed first; with `sample_memory`, the memory of it and its
    decode workers sampled while it runs (each sample walks the processes' page tables and stalls them: only
    in runs that are not timed)."""
    features = Path(work) / f"features-{root.name}"
    shutil.rmtree(features, ignore_errors=True)
    result = in_fresh_process("stage_one", "child_extract", data_dir=str(root.parent), name=root.name, model=model,
                              weights=weights, features_dir=str(features), device=str(device),
                              precision=precision, batch_size=batch_size, workers=workers, decode=decode,
                              compiled=compiled, sample_memory=sample_memory)
    shutil.rmtree(features, ignore_errors=True)
    return result


def vehicles_accuracy(shared, device, batch_size, workers, work, bf16=True, decode="cpu"):
    """Softmax-head test accuracy on vehicles (MobileNetV2, real weights) from fp32 caches made with the fast
    recipe and torchvision's, (`bf16`) a bf16 cache, (`decode` "device") an fp32 cache decoded on the device, and
    their codes' cosine to the first's -> {run: accuracy, "*cosine": [N]}, or None without the weights."""
    weights = Path(shared) / MOBILENET_WEIGHTS
    if not weights.is_file() or not (Path(shared) / "data" / "vehicles").is_dir():
        return None
    table = load_dataset("vehicles", Path(shared) / "data")
    accuracy, codes = {}, {}
    runs = ["fp32", "fp32-reference"] + ["bf16"] * bool(bf16) + ["fp32-device"] * (decode == "device")
    for run in runs:
        precision, recipe = run[:4], "reference" if run.endswith("reference") else "fast"
        backbone = load_backbone("mobilenet_v2", str(weights), preprocessing=recipe)
        features = Path(work) / f"vehicles-{run}"
        result = extract_features(table, backbone, ["penultimate"], features, device=device, precision=precision,
                                  batch_size=batch_size, num_workers=workers, progress=False,
                                  decode="device" if run.endswith("device") else "cpu")
        accuracy[run] = train_head(result.path, "penultimate", "softmax", features / "heads")["test_accuracy"]
        with FeatureCache(result.path) as cache:
            codes[run] = cache.features(cache.layers[0])[0]
    return {**accuracy, "cosine": cosine(codes["fp32"], codes["bf16"]) if bf16 else None,
            "reference_cosine": cosine(codes["fp32"], codes["fp32-reference"]),
            "device_cosine": cosine(codes["fp32"], codes["fp32-device"]) if decode == "device" else None}


# ---------------------------------------------------------------------------
# The run


def speed_runs(backbone, table, root, large, large_model, setup, run, work, say, loads):
    """The tutorial loop, the ceiling, the pipeline runs each between two ceilings, the long run between
    two more, the tutorial loop again -> their rates (bases, tops, smalls, big, tops_large), and the
    ceiling's codes and batches; `loads`: each phase's load average."""
    device, precision = run["device"], setup["precision"]
    say("baseline: the tutorial loop, in a fresh process")
    loads["baseline"] = os.getloadavg()[0]
    bases = [fresh_baseline(root, setup["model"], setup["weights"], device)]
    say("ceiling: forward pass on batches in memory")
    loads["ceiling"] = os.getloadavg()[0]
    top, codes, batches, prepared = ceiling(backbone, table, device, precision, setup["batch_size"], setup["workers"],
                                            setup["compiled"])
    tops, smalls = [top], []
    for k in range(PIPELINE_RUNS):  # each run between two ceilings: drift on a shared machine cancels
        say(f"pipeline: extract in a fresh process ({k + 1} of {PIPELINE_RUNS}), then the ceiling again")
        loads[f"pipeline_{k + 1}"] = os.getloadavg()[0]
        smalls.append(fresh_extract(root, setup["model"], work=work, **run))
        tops.append(forward_rate(prepared, batches, device, precision)[0])
    say(f"long run: extract on {large.name} ({large_model}), then the ceiling again")
    loads["large"] = os.getloadavg()[0]
    big = fresh_extract(large, large_model, work=work, **run)
    tops_large = [tops[-1], forward_rate(prepared, batches, device, precision)[0]]
    say("baseline again: the tutorial loop, in a fresh process")
    loads["baseline_2"] = os.getloadavg()[0]
    bases.append(fresh_baseline(root, setup["model"], setup["weights"], device))
    return {"bases": bases, "tops": tops, "smalls": smalls, "big": big, "tops_large": tops_large, "codes": codes,
            "batches": batches}


def run_bench(model="resnet50", images=IMAGES, shared="../shared", reports_dir="reports", precision="auto",
              batch_size=None, workers=None, accuracy=True, corpus_dir="bench/corpus", weights=None,
              large_model=None, device="auto", decode="cpu", compiled=False, large_factor=LARGE_FACTOR, bf16=None,
              say=print):
    """Every measurement on one corpus -> the result dict (also written to reports_dir/bench.json).
    `bf16`: measure what bf16 changes in the codes; None: where the run is in bf16 or bf16 runs natively."""
    started = time.perf_counter()
    device = resolve_device(device)
    setup = {"model": model, "weights": weights or "none", "precision": resolve_precision(precision, device),
             "batch_size": batch_size or default_batch_size(device), "decode": decode, "compiled": compiled,
             "workers": default_workers(device) if workers is None else workers}
    large_model = large_model or model
    bf16_here = "bf16" in (setup["precision"], resolve_precision("auto", device))
    bf16 = bf16_here if bf16 is None else bf16
    unmeasured = None if bf16 else "--no-bf16" if bf16_here else "no native bf16"
    run = {"device": device, **{k: v for k, v in setup.items() if k != "model"}}  # fresh_extract's keywords
    loads = {}

    say(f"corpus: {images} images in {corpus_dir} (made once)")
    root = make_corpus(shared, corpus_dir, images)
    large = repeat_corpus(root, large_factor)
    table = load_dataset(root.name, root.parent)
    backbone = load_backbone(model, setup["weights"])
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as work:
        speed = speed_runs(backbone, table, root, large, large_model, setup, run, work, say, loads)
        codes, batches = speed.pop("codes"), speed.pop("batches")
        say("preprocessing: each step's cost, the fast recipe's codes against torchvision's, start-up")
        steps = {"steps_ms": step_costs(table, model), **fast_fidelity(table, model, device, setup["precision"]),
                 "device_steps_ms": device_step_costs(table, model, device) if decode == "device" else None,
                 **fresh_startup_costs(model, setup["weights"], batches[0].shape, device, setup["precision"], compiled)}
        say("bf16: codes against fp32" if bf16 else f"bf16: not measured ({unmeasured})")
        similarity, compared = bf16_cosine(backbone, batches, codes, device, setup["precision"]) if bf16 else (None, 0)
        del batches
        small_memory = speed["smalls"][0] if large_model == model else fresh_extract(root, large_model, work=work, **run)
        big_memory = speed["big"]
        if setup["workers"]:  # sampled apart: each sample stalls the processes it walks, so never in a timed run
            say("memory: both extracts again, untimed, their decode workers' memory sampled")
            sampled = [fresh_extract(r, large_model, work=work, sample_memory=True, **run) for r in (root, large)]
            small_memory, big_memory = ({**timed, "tree_pss_mb": s["tree_pss_mb"]}
                                        for timed, s in zip((small_memory, big_memory), sampled))
        scores = None
        if accuracy:
            say(f"accuracy: vehicles, MobileNetV2, fp32 caches{' and a bf16 cache' if bf16 else ''}")
            scores = vehicles_accuracy(shared, device, None, None, work, bf16, decode)

    result = {**setup, "memory_format": "channels_last", "jpeg_draft": True, "device": str(device),
              "images": len(table), "image_sizes": [f"{w}x{h}" for w, h in corpus.SIZES], "jpeg_quality": corpus.QUALITY,
              "corpus": str(root), "corpus_mb": round(sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2**20, 1),
              "machine": machine(device),
              **speed_figures(speed["tops"], speed["smalls"], speed["bases"],
                              speed["big"] if large_model == model else None, speed["tops_large"]),
              **memory_figures(small_memory, big_memory, large_model),
              **bf16_figures(similarity, compared, scores), "bf16_not_measured": unmeasured, **steps,
              "load_average": {phase: round(load, 2) for phase, load in loads.items()},
              "seconds": round(time.perf_counter() - started, 1)}
    result["forward_cpu_share"] = forward_shares(result)
    result["targets"] = targets(result)
    Path(reports_dir).mkdir(parents=True, exist_ok=True)
    (Path(reports_dir) / "bench.json").write_text(json.dumps(result, indent=2))
    return result


@click.command()
@click.option("--model", default="resnet50", show_default=True, help="Any torchvision classifier.")
@click.option("--images", type=click.IntRange(min=1), default=IMAGES, show_default=True,
              help="Corpus size N (the long run and the memory run use N x --large-factor).")
@click.option("--shared", type=click.Path(path_type=Path), default=Path("../shared"), show_default=True,
              help="Folder with data/vehicles (the corpus source) and the MobileNetV2 weights.")
@click.option("--reports-dir", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: the pipeline's.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Default: the pipeline's.")
@click.option("--accuracy/--no-accuracy", default=True, show_default=True,
              help="Also extract vehicles with both recipes (and bf16) and compare softmax test accuracy.")
@click.option("--bf16/--no-bf16", default=None, help="Measure what bf16 changes in the codes and accuracy "
              "(default: where the run is in bf16 or the hardware runs bf16 natively).")
@click.option("--corpus-dir", type=click.Path(path_type=Path), default=Path("bench/corpus"), show_default=True)
@click.option("--weights", default="none", show_default=True, help="Bench model weights: none, default or a .pth.")
@click.option("--large-model", default=None, help="Model of the long run and the memory run (default: --model).")
@click.option("--large-factor", type=click.IntRange(min=2), default=LARGE_FACTOR, show_default=True,
              help="The long run's images: N times this (on a GPU, 100: a run long enough to reach its pace).")
@click.option("--device", default="auto", show_default=True)
@click.option("--decode", type=click.Choice(["cpu", "device"]), default="cpu", show_default=True,
              help="Where `extract` decodes the JPEGs (device: nvJPEG on a GPU; pip install -e '.[gpu]').")
@click.option("--compile", "compiled", is_flag=True, help="The model through torch.compile, in the ceiling and the "
              "pipeline alike (compiling is start-up: in the pipeline's time, out of the ceiling's).")
def main(model, images, shared, reports_dir, precision, batch_size, workers, accuracy, bf16, corpus_dir, weights,
         large_model, large_factor, device, decode, compiled):
    """Stage-one speed against the forward-pass ceiling and the tutorial loop; writes bench.json."""
    try:
        result = run_bench(model=model, images=images, shared=shared, reports_dir=reports_dir, precision=precision,
                           batch_size=batch_size, workers=workers, accuracy=accuracy, corpus_dir=corpus_dir,
                           weights=weights, large_model=large_model, device=device, decode=decode,
                           compiled=compiled, large_factor=large_factor, bf16=bf16,
                           say=lambda text: click.echo(text, err=True))
    except PipelineError as e:
        raise click.ClickException(str(e)) from None
    click.echo(table_text(result))
    click.echo(f"wrote {Path(reports_dir) / 'bench.json'}")


if __name__ == "__main__":
    main()
