"""Stage one on Ray against the local engine, on the bench corpus, in one run (`make bench ENGINE=ray`).

    python benchmarks/ray_engine.py                      # resnet50, 384 photo-sized JPEGs, a Ray started here
    python benchmarks/ray_engine.py --address auto       # on the cluster RAY_ADDRESS points at

    cluster   seconds to start a one-machine Ray (`ray start --head`), apart: a cluster is
              started once, not per extract; every Ray run below joins it, as a user's would
    engines   `extract` in fresh processes, local, ray, local, ray, on the same corpus (the
              stage-one bench's N images), then local, ray on its 10 N images; the ratio
              is the mean Ray rate over the mean local rate, per corpus
    equal     the Ray cache against the local one: ids, labels, splits, sha256, cosine of codes
    writer    the driver's writer alone (store.PartialCache, append then finish) on codes of
              1280, 2048 and 4096 dims: the bytes of codes per second one driver can take,
              which caps the images/s of any cluster

Prints a table and writes REPORTS_DIR/bench-ray.json. A script, not a test.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from corpus import make_corpus, repeat_corpus
from measure import cosine, describe_cpu, in_fresh_process, machine
from pipeline.sources import Batch
from pipeline.store import FeatureCache, PartialCache
from stage_one import IMAGES, LARGE_FACTOR

ROUNDS = 2                  # local, ray, local, ray
WRITER_ROWS, WRITER_BATCH = 20_000, 256


def start_cluster():
    """A Ray head on this machine -> (address, seconds it took)."""
    ray = str(Path(sys.executable).with_name("ray"))
    t0 = time.perf_counter()
    out = subprocess.run([ray, "start", "--head", "--include-dashboard=false", "--disable-usage-stats"],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise click.ClickException(f"ray start failed: {out.stderr.strip()[-500:]}")
    return "auto", time.perf_counter() - t0


def stop_cluster():
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, timeout=300)


def engines(root, model, precision, batch_size, address, work, rounds=ROUNDS):
    """Alternating fresh-process extracts -> ({engine: [run results]}, {engine: cache path} of the last runs)."""
    runs, caches = {"local": [], "ray": []}, {}
    for k in range(rounds):
        for engine in ("local", "ray"):
            features = Path(work) / f"{root.name}-{engine}-{k}"
            runs[engine].append(in_fresh_process(
                "stage_one", "child_extract", data_dir=str(root.parent), name=root.name, model=model, weights="none",
                features_dir=str(features), device="auto", precision=precision, batch_size=batch_size, workers=None,
                engine=engine, ray_address=address if engine == "ray" else None))
            caches[engine] = next(features.rglob("*.h5"))
    return runs, caches


def same_cache(a, b):
    with FeatureCache(a) as x, FeatureCache(b) as y:
        same = (list(x.ids) == list(y.ids) and list(x.split) == list(y.split) and list(x.sha256) == list(y.sha256)
                and np.array_equal(x.labels, y.labels))
        similarity = cosine(x.features(x.layers[0])[0], y.features(y.layers[0])[0])
    return {"same_rows": bool(same), "cosine_min": round(float(similarity.min()), 6)}


def writer_rate(dim, work):
    """MB of codes per second through PartialCache: append (batch files) and finish (the HDF5 file)."""
    path = Path(work) / f"writer-{dim}.h5"
    n = WRITER_ROWS
    writer = PartialCache.create(path, ids=[f"{i}.jpg" for i in range(n)], labels=np.zeros(n, np.int64),
                                 split=["train"] * n, class_names=["a"], layer_dims={"x": (dim, {})}, attrs={})
    codes = np.random.default_rng(0).normal(size=(WRITER_BATCH, dim)).astype(np.float32)
    t0 = time.perf_counter()
    for lo in range(0, n, WRITER_BATCH):
        rows = np.arange(lo, min(n, lo + WRITER_BATCH))
        writer.append(Batch(rows, None, ["0" * 64] * len(rows), [""] * len(rows)), {"x": codes[:len(rows)]})
    appended = time.perf_counter() - t0
    writer.finish({})
    total = time.perf_counter() - t0
    path.unlink()
    mb = n * dim * 4 / 2**20
    return {"dim": dim, "append_mb_s": round(mb / appended, 1), "mb_s": round(mb / total, 1),
            "images_per_s": round(n / total, 1)}


def run(model, images, shared, precision, batch_size, address, corpus_dir):
    started = time.perf_counter()
    root = make_corpus(shared, corpus_dir, images)
    corpora = [(root, ROUNDS), (repeat_corpus(root, LARGE_FACTOR), 1)]
    own = address is None
    address, start_seconds = start_cluster() if own else (address, None)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-ray-") as work:
            measured = []
            for corpus, rounds in corpora:
                runs, caches = engines(corpus, model, precision, batch_size, address, work, rounds)
                measured.append({"images": len(list(corpus.rglob("*.jpg"))), **rates(runs),
                                 **same_cache(caches["local"], caches["ray"])})
            writer = [writer_rate(dim, work) for dim in (1280, 2048, 4096)]
    finally:
        if own:
            stop_cluster()
    return {"model": model, "precision": precision, "batch_size": batch_size,
            "machine": machine(__import__("torch").device("cpu")),
            "ray_start_seconds": start_seconds and round(start_seconds, 1), "corpora": measured, "writer": writer,
            "seconds": round(time.perf_counter() - started, 1)}


def rates(runs):
    rate = {engine: float(np.mean([r["images_per_s"] for r in results])) for engine, results in runs.items()}
    return {"local_img_s": round(rate["local"], 2), "ray_img_s": round(rate["ray"], 2),
            "ratio_ray_vs_local": round(rate["ray"] / rate["local"], 3),
            "runs_img_s": {e: [round(r["images_per_s"], 2) for r in results] for e, results in runs.items()},
            "inner_img_s": {e: [round(r["inner_images_per_s"], 2) for r in results] for e, results in runs.items()},
            "maxrss_mb": {e: [round(r["maxrss_mb"]) for r in results] for e, results in runs.items()}}


def table_text(r):
    lines = [f"Ray engine bench: {r['model']} (random weights), precision {r['precision']}, "
             f"batch {r['batch_size'] or 'default'}; {describe_cpu(r['machine'])}",
             f"  Ray start (once, apart): {r['ray_start_seconds']} s"]
    for c in r["corpora"]:
        lines += [f"  {c['images']} JPEGs: local {c['local_img_s']:.2f} img/s (runs {c['runs_img_s']['local']}), "
                  f"ray {c['ray_img_s']:.2f} img/s (runs {c['runs_img_s']['ray']}): {c['ratio_ray_vs_local']:.3f} x local",
                  f"    same rows: {c['same_rows']}; codes cosine min {c['cosine_min']}; "
                  f"peak RSS of the driver: local {c['maxrss_mb']['local']} MB, ray {c['maxrss_mb']['ray']} MB"]
    lines += [f"  writer, {w['dim']}-D codes: append {w['append_mb_s']} MB/s, with finish {w['mb_s']} MB/s "
              f"= {w['images_per_s']:.0f} images/s" for w in r["writer"]]
    return "\n".join(lines + [f"  ({r['seconds']:.0f} s in all)"])


@click.command()
@click.option("--model", default="resnet50", show_default=True)
@click.option("--images", type=click.IntRange(min=1), default=IMAGES, show_default=True)
@click.option("--shared", type=click.Path(path_type=Path), default=Path("../shared"), show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--address", default=None, help="A running cluster (auto, host:port); default: start one here.")
@click.option("--corpus-dir", type=click.Path(path_type=Path), default=Path("bench/corpus"), show_default=True)
@click.option("--reports-dir", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
def main(model, images, shared, precision, batch_size, address, corpus_dir, reports_dir):
    """The Ray engine against the local engine on the bench corpus; writes bench-ray.json."""
    result = run(model, images, shared, precision, batch_size, address, corpus_dir)
    Path(reports_dir).mkdir(parents=True, exist_ok=True)
    (Path(reports_dir) / "bench-ray.json").write_text(json.dumps(result, indent=2))
    click.echo(table_text(result))
    click.echo(f"wrote {Path(reports_dir) / 'bench-ray.json'}")


if __name__ == "__main__":
    main()
