"""Stage-two speed and memory: every head's whole protocol on synthetic and real caches.

    python benchmarks/heads.py                       # N = 10k, 100k, 1M (D 2048, K 100): `make bench-heads`
    python benchmarks/heads.py --sizes 10000 --cache features/vehicles/mobilenet_v2-file-39a5f077.h5
    python benchmarks/heads.py --sizes '' --fashion 60000,3000   # real MobileNetV2 codes of 60k and 3k images

For each cache and head, in a fresh process each (so peak RSS is the head's own):
the torch protocol (probe.py: every C at once, streamed when over the memory budget)
and scikit-learn's exact estimators (one fit per C) where they finish within
--sklearn-limit seconds: seconds for selection + refit + test, peak RSS, the chosen C
and the test accuracy of both. The synthetic caches are class-structured (Gaussian
classes in a 64-D latent space, mapped to D features through a random matrix and a
ReLU, like CNN codes), seeded, made once under bench/heads/ and kept. --fashion N makes
a cache of real codes at the scale of the issue: N 28x28 images varied from the
Fashion-MNIST subset in --shared (shifts, turns, scales, mirrors; each source image's
variants stay in one split, so no test image is a variant of a training one), run
through the real MobileNetV2 once (at the default precision: bf16 on a CPU with native
bf16; about 8 minutes for 60k on 2 cores) and kept. A script, not a test: nothing here
is asserted.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from pipeline.cli import BYTES
from pipeline.errors import PipelineError
from pipeline.layer_codes import default_memory_budget, resolve_layer
from pipeline.store import FeatureCache
from pipeline.store.cache import write_cache_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, whether run as a script or imported
from measure import MOBILENET_WEIGHTS, cpu, describe_cpu, in_fresh_process, peak_rss_mb  # noqa: E402

HEADS = ("softmax", "svm", "linear")
SIZES = (10_000, 100_000, 1_000_000)
DIM, CLASSES, LATENT = 2048, 100, 64
SEPARATION = 0.45          # class means' spread in the latent space: test accuracy about 0.8
BLOCK = 16_384             # rows generated and written at a time
FASHION_SPLITS = {"train": 42_500, "val": 7_500, "test": 10_000}  # per 60,000, as the cache
SKLEARN_LIMIT = 300        # seconds: the scikit-learn path is stopped there
ROWS_VERSION = "r3"        # in the file name: r2 rows carry path-like ids, sizes and hashes; r3 16-row chunks


def synthetic_cache(folder, n, d=DIM, k=CLASSES, seed=0, class_order=False):
    """A cache file of n class-structured rows (made once; its name says how) -> its path. `class_order`:
    rows by split, then class, as class folders list them (else in random order)."""
    order = "-sorted" if class_order else ""
    path = Path(folder) / "synthetic" / f"gauss-n{n}-d{d}-k{k}-s{seed}{order}-{ROWS_VERSION}.h5"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, SEPARATION, (k, LATENT))
    mixing = rng.normal(0.0, 1.0 / np.sqrt(LATENT), (LATENT, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    split = rng.choice(np.array(["train", "val", "test"]), size=n, p=[0.7, 0.15, 0.15])
    if class_order:
        rows = np.lexsort((labels, split))
        labels, split = labels[rows], split[rows]

    def fill(layers):
        for lo in range(0, n, BLOCK):
            y = labels[lo:lo + BLOCK]
            z = (means[y] + rng.normal(0.0, 1.0, (len(y), LATENT))).astype(np.float32)
            layers["penultimate"][lo:lo + len(y)] = np.maximum(
                z @ mixing + rng.normal(0.0, 0.5, (len(y), d)).astype(np.float32), 0.0)

    ids = [f"c{label:03d}/{i:08d}.jpg" for i, label in enumerate(labels)]  # as long as real ids and hashes
    stamps = [f"{90_000 + i}:1764633600000000000" for i in range(n)]  # size:mtime_ns
    columns = {"labels": labels, "ids": ids, "split": split, "stamp": stamps,
               "sha256": [hashlib.sha256(id_.encode()).hexdigest() for id_ in ids]}
    attrs = {"dataset": f"gauss-{n}", "model": "synthetic", "weights": "random", "penultimate": "penultimate",
             "settings": {"layers": ["penultimate"], "seed": seed}, "precision": "fp32"}
    tmp = path.with_name(path.name + ".tmp")
    write_cache_file(tmp, columns, ([], []), {"penultimate": [d, {"pooling": "none", "depth": 0}]},
                     [f"c{i}" for i in range(k)], attrs, fill)
    tmp.replace(path)
    return path


def fashion_corpus(shared, folder, n, seed=0):
    """n variants of the Fashion-MNIST subset's images as folder/data/fashion-N/{train,val,test}/<class>/*.png
    (made once) -> the data folder and the data set's name. Source images are split first, in the
    issue's proportions, and each split's variants come from its own sources only."""
    name = f"fashion-{n}"
    root = Path(folder) / "data" / name
    done = root / "DONE"
    if done.exists():
        return root.parent, name
    source = Path(shared) / "data" / "fashion-mnist-subset" / "fashion_mnist_subset.csv"
    if not source.is_file():
        raise click.ClickException(f"{source}: not found; pass --shared PATH (the folder holding data/)")
    table = np.loadtxt(source, delimiter=",", skiprows=1, dtype=np.uint8)  # y, pixel0..pixel783
    labels, pixels = table[:, 0], table[:, 1:].reshape(-1, 28, 28)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    total = sum(FASHION_SPLITS.values())
    share = np.cumsum([0] + [count / total for count in FASHION_SPLITS.values()])
    for s, split in enumerate(FASHION_SPLITS):
        sources = order[round(share[s] * len(order)):round(share[s + 1] * len(order))]
        count = round(FASHION_SPLITS[split] / total * n)
        for i, k in enumerate(rng.choice(sources, count)):
            path = root / split / f"class{labels[k]}" / f"{split}-{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            _variant(Image.fromarray(pixels[k]), rng).save(path)
    done.write_text(json.dumps({"images": n, "seed": seed}))
    return root.parent, name


def _variant(img, rng):
    """The image shifted, turned, scaled and maybe mirrored a little, as augmentation does."""
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle, scale = rng.uniform(-12, 12), rng.uniform(0.9, 1.1)
    shift = rng.uniform(-2.5, 2.5, 2)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=tuple(shift))
    size = round(28 * scale)
    canvas = Image.new("L", (max(28, size), max(28, size)))  # black, as the background
    canvas.paste(img.resize((size, size), Image.Resampling.BILINEAR), ((canvas.width - size) // 2,) * 2)
    left = (canvas.width - 28) // 2
    return canvas.crop((left, left, left + 28, left + 28))


def fashion_cache(shared, folder, n):
    """The real MobileNetV2's codes of fashion_corpus(n), extracted once -> the cache's path."""
    from pipeline.backbones import load_backbone
    from pipeline.datasets import load_dataset
    from pipeline.extract import extract_features

    data_dir, name = fashion_corpus(shared, folder, n)
    weights = Path(shared) / MOBILENET_WEIGHTS
    result = extract_features(load_dataset(name, data_dir), load_backbone("mobilenet_v2", str(weights)),
                              ["penultimate"], Path(folder) / "features")
    return result.path


def child_train(cache, layer, head, solver, out, exact=False, memory_budget=None):
    """One head's protocol (called in a fresh process) -> its figures; `exact`: also the test accuracy
    of scikit-learn's exact fit at the C the protocol chose (LogisticRegression for softmax and linear)."""
    from pipeline.train import train_head

    t0 = time.perf_counter()
    result = train_head(cache, layer, head, out_dir=out, solver=solver, memory_budget=memory_budget)
    figures = {"seconds": round(time.perf_counter() - t0, 2), "protocol_seconds": result["seconds"],
               "maxrss_mb": round(peak_rss_mb(), 1),
               "C": result["C"], "val_accuracy": result["val_accuracy"], "test_accuracy": result["test_accuracy"],
               "what_ran": result["solver"], "streamed": result["streamed"], "select_rows": result["select_rows"],
               "n_train": result["n_train"], "layer": result["layer"]}
    if exact:
        figures["exact_test_accuracy_at_C"] = exact_accuracy(cache, result["layer"], head, result["C"])
    return figures


def exact_accuracy(cache, layer, head, C):
    """Test accuracy of scikit-learn's exact fit of `head` at C on train+val (the layer in memory)."""
    from pipeline.heads import LinearModel, fit
    from pipeline.train import load_codes, score_head

    codes = load_codes(cache, layer)
    both = codes.rows("train", "val")
    pipeline = fit("svm" if head == "svm" else "softmax", C, codes.X[both], codes.labels[both])
    return score_head(LinearModel.from_pipeline(pipeline, codes.class_names, "probability"), codes)["test_accuracy"]


def child_reference(cache, layer):
    """One plain scikit-learn LogisticRegression fit (lbfgs, its defaults: C=1, 100 iterations) on the
    standardised train rows: the yardstick of the issue's target."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.train import load_codes

    codes = load_codes(cache, layer, memory_budget=2**62)
    rows = codes.rows("train")
    X = codes.matrix(rows, codes.scaler("train"))
    t0 = time.perf_counter()
    LogisticRegression().fit(X, codes.labels[rows])
    return {"seconds": round(time.perf_counter() - t0, 2)}


def fresh_figures(limit, function="child_train", **args):
    """heads.<function>(**args) in a new Python process -> its figures, {"stopped": limit} past `limit`
    seconds, or {"failed": [the error's last line]}: one head that fails does not stop the bench."""
    try:
        return in_fresh_process("heads", function, limit=limit, **args)
    except PipelineError as e:
        return {"failed": str(e).strip().splitlines()[-1:]}


def run(caches, heads, sklearn_limit, out, memory_budget, say=print):
    """Every head on every (cache, layer, real?) with both solvers -> rows of figures. scikit-learn holds
    the layer in memory whatever the budget, and is not run where that would take half the machine's memory."""
    rows = []
    for cache, layer, real in caches:
        if _layer_bytes(cache, layer) * 4 <= default_memory_budget() * 2:
            say(f"{Path(cache).name} {layer}: one plain LogisticRegression fit")
            reference = fresh_figures(sklearn_limit, "child_reference", cache=str(cache), layer=layer)
            rows.append({"cache": str(cache), "head": "one LogisticRegression fit at C=1", "solver": "sklearn",
                         "reference": True, **reference})
        for head in heads:
            for solver, limit in (("torch", None), ("sklearn", sklearn_limit)):
                say(f"{Path(cache).name} {layer}: {head}, {solver}")
                if solver == "sklearn" and _layer_bytes(cache, layer) * 4 > default_memory_budget() * 2:
                    rows.append({"cache": str(cache), "head": head, "solver": solver, "skipped": "too big for memory"})
                    continue
                figures = fresh_figures(limit, cache=str(cache), layer=layer, head=head, solver=solver,
                                        out=str(out), exact=real and solver == "torch",
                                        memory_budget=memory_budget if solver == "torch" else 2**62)
                rows.append({"cache": str(cache), "head": head, "solver": solver, **figures})
                say(f"  {figures}")
    return rows


def _layer_bytes(cache, layer):
    with FeatureCache(cache) as f:
        n, d = f.h5["layers"][resolve_layer(f, layer)].shape
    return n * d * 4


def table(rows):
    lines = ["| cache | layer | head | solver | seconds | peak RSS MB | C | test acc | exact fit at C |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = f"{Path(r['cache']).parent.name}/{Path(r['cache']).stem}"
        if "seconds" not in r:
            why = (f"stopped at {r['stopped']} s" if "stopped" in r else f"not run: {r['skipped']}" if "skipped" in r
                   else f"failed: {r.get('failed')}")
            lines.append(f"| {name} | | {r['head']} | {r['solver']} | {why} | | | | |")
            continue
        if r.get("reference"):
            lines.append(f"| {name} | | {r['head']} | sklearn | {r['seconds']:.1f} | | | | |")
            continue
        exact = r.get("exact_test_accuracy_at_C")
        lines.append(f"| {name} | {r['layer']} | {r['head']} | {r['solver']}{' (streamed)' if r['streamed'] else ''} "
                     f"| {r['protocol_seconds']:.1f} | {r['maxrss_mb']:.0f} | {r['C']:.3g} | {r['test_accuracy']:.4f} "
                     f"| {'' if exact is None else f'{exact:.4f}'} |")
    return "\n".join(lines)


@click.command()
@click.option("--sizes", default=",".join(map(str, SIZES)), show_default=True, help="Synthetic cache sizes N.")
@click.option("--cache", "caches", multiple=True, help="A real cache too, as PATH or PATH@LAYER (repeat).")
@click.option("--fashion", default="", help="Also caches of real MobileNetV2 codes of N Fashion-MNIST variants (N,N,..).")
@click.option("--shared", type=click.Path(path_type=Path), default=Path("../shared"), show_default=True,
              help="Folder with data/fashion-mnist-subset and the MobileNetV2 weights (for --fashion).")
@click.option("--class-order", is_flag=True, help="Synthetic rows by split, then class (as class folders give).")
@click.option("--heads", default=",".join(HEADS), show_default=True)
@click.option("--sklearn-limit", type=int, default=SKLEARN_LIMIT, show_default=True)
@click.option("--memory-budget", type=BYTES, default="1G", show_default=True,
              help="The torch heads' budget: the 100k and 1M caches stream under the default, so their RSS compares.")
@click.option("--folder", type=click.Path(path_type=Path), default=Path("bench/heads"), show_default=True)
@click.option("--reports-dir", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
def main(sizes, caches, fashion, shared, class_order, heads, sklearn_limit, memory_budget, folder, reports_dir):
    """Every head's protocol on synthetic caches of each size (and real caches): seconds, RSS, accuracy."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # each head's process as `make train-head` runs it (cli)
    say = lambda text: click.echo(text, err=True)
    paths = [(synthetic_cache(folder, int(n), class_order=class_order), "penultimate", False)
             for n in sizes.split(",") if n]
    paths += [(*(c.split("@", 1) if "@" in c else (c, "penultimate")), True) for c in caches]
    paths += [(str(fashion_cache(shared, folder, int(n))), "penultimate", True) for n in fashion.split(",") if n]
    rows = run(paths, heads.split(","), sklearn_limit, folder / "heads-out", memory_budget, say)
    reports_dir.mkdir(parents=True, exist_ok=True)
    machine = cpu()
    (reports_dir / "bench-heads.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    click.echo(f"machine: {describe_cpu(machine)}\n{table(rows)}")


if __name__ == "__main__":
    main()
