"""The report's figures: confusion matrix, accuracy against depth, misclassified thumbnails.

    plot_confusion(run, "vehicles: mobilenet_v2, file-39a5f077", "reports/vehicles-confusion.png")

Each takes result dicts (store.results.HeadResult) and writes one PNG; no torch.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is set)
import numpy as np  # noqa: E402

from .datasets import reopen_dataset  # noqa: E402

STRIP_SIZE = 12


def plot_confusion(run, title, path):
    """Confusion matrix of a run's test predictions: counts, shaded by share of the true class."""
    counts = np.asarray(run["confusion_matrix"], dtype=float)
    names = [str(n)[:20] for n in run["class_names"]]
    k = len(names)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * k, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    if k <= 40:
        ax.set_xticks(range(k), names, rotation=90 if k > 6 else 0, fontsize=8 if k > 15 else 10)
        ax.set_yticks(range(k), names, fontsize=8 if k > 15 else 10)
    if k <= 20:
        for i, j in np.ndindex(counts.shape):
            ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\n{run['layer']}, {run['head']}: test accuracy {run['test_accuracy']:.3f}", fontsize=10)
    return _save(fig, path)


def plot_depth(runs, chosen, title, path):
    """Val and test accuracy against layer depth for one group (`runs`, input side first); `chosen` starred."""
    x = np.arange(len(runs))
    val = [r["val_accuracy"] for r in runs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(runs) + 2), 4))
    ax.plot(x, val, "o-", label="val")
    ax.plot(x, [r["test_accuracy"] for r in runs], "s--", label="test")
    at = runs.index(chosen)
    ax.plot(at, val[at], "*", markersize=18, color="gold", markeredgecolor="black",
            label=f"chosen: {runs[at]['layer']}")
    ax.set_xticks(x, [r["layer"] for r in runs], rotation=30, ha="right")
    ax.set_xlabel("layer (input side to output side)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def thumbnail_strip(run, data_dir, path, limit=STRIP_SIZE):
    """Up to `limit` misclassified test images with true and predicted labels -> one PNG, the images
    read from the run's data set (datasets.reopen_dataset). Returns None when written, else a
    one-line reason it was not."""
    wrong = [m for m in run.get("misclassified") or [] if isinstance(m, dict) and "id" in m]
    if not wrong:
        return "no misclassified test images listed"
    try:
        table = reopen_dataset(run.get("dataset_root"), run["dataset"], data_dir)
        row_of = {str(i): row for row, i in enumerate(table.ids)}
        shown = []
        for m in wrong:
            row = row_of.get(str(m["id"]))
            # the label check catches a data set that changed since extraction
            if row is not None and table.class_names[table.labels[row]] == m.get("true"):
                shown.append((table.load_image(row), m))
            if len(shown) == limit:
                break
    except Exception as e:  # noqa: BLE001 - a missing thumbnail must not sink the report
        return f"images not loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    if not shown:
        return "none of the misclassified ids were found in the data set with the same label"
    cols = min(6, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, m) in zip(axes.flat, shown):
        image.thumbnail((128, 128))
        ax.imshow(image, interpolation="nearest" if max(image.size) < 64 else "antialiased")
        ax.set_title(f"true: {str(m.get('true'))[:14]}\npred: {str(m.get('predicted'))[:14]}", fontsize=8)
    _save(fig, path)
    return None
