"""Compare every trained head: runs.json, report.md, index.html and their PNGs.

    from pipeline.report import write_report
    table, paths = write_report("features", "reports", "data")
    print(table)   # the same runs as a fixed-width table, then any skipped files

Reads only the result JSON that `heads.train_head` writes next to each head
(FEATURES_DIR/*/heads/*.json); nothing is unpickled and torch is never imported.
The best run of a data set is the one with the highest *validation* accuracy
(ties: a sweep's chosen layer, then the first in sort order); test accuracy is
reported, never used to choose.
Runs on random weights are labelled "random (untrained)" wherever weights show.
"""
import html
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is set)
import numpy as np  # noqa: E402

from .errors import PipelineError  # noqa: E402

# Keys a result must hold, with their JSON types; files without them are skipped.
REQUIRED = {"dataset": str, "model": str, "weights": str, "layer": str, "head": str, "dim": int,
            "n_train": int, "n_val": int, "n_test": int, "C": float, "val_accuracy": float,
            "test_accuracy": float, "test_balanced_accuracy": float, "test_macro_f1": float,
            "confusion_matrix": list, "class_names": list, "per_class": list}
RUN_FIELDS = ("dataset", "model", "weights", "weights_sha256", "layer", "depth", "pooling", "head", "dim",
              "n_train", "n_val", "n_test", "C", "val_accuracy", "test_accuracy", "test_balanced_accuracy",
              "test_macro_f1", "head_file", "result_file")
COLUMNS = ("dataset", "model", "weights", "layer", "head", "dim", "train", "val", "test", "C",
           "val acc", "test acc", "balanced acc", "macro-F1", "chosen")
CLASS_COLUMNS = ("class", "precision", "recall", "F1", "support")
STRIP_SIZE = 12


def collect_runs(features_dir):
    """Every usable result JSON under FEATURES_DIR/*/heads/ -> (runs in sort order, warnings)."""
    runs, warnings = [], []
    for path in sorted(Path(features_dir).glob("*/heads/*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError covers bad JSON and bad UTF-8
            warnings.append(f"warning: skipped {path}: not readable JSON ({e})")
            continue
        problem = _problem(result)
        if problem:
            warnings.append(f"warning: skipped {path}: {problem}")
            continue
        runs.append({**result, "result_file": str(path)})
    if not runs:
        why = f" ({len(warnings)} unusable; {warnings[0][9:]})" if warnings else ""
        raise PipelineError(f"no trained heads under {features_dir}/*/heads{why}; run `make train-head` first")
    return sorted(runs, key=sort_key), warnings


def _problem(result):
    """Why a parsed result cannot be reported, or None."""
    if not isinstance(result, dict):
        return "not a JSON object"
    missing = [key for key in REQUIRED if key not in result]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, kind in REQUIRED.items():
        value = result[key]
        number = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, number) or (kind is float and not math.isfinite(value)):
            return f"{key} is not a {kind.__name__}"
    k = len(result["class_names"])
    if np.shape(result["confusion_matrix"]) != (k, k):
        return f"confusion_matrix is not {k}x{k}"
    if not all(isinstance(c, dict) and {"class", "precision", "recall", "f1", "support"} <= c.keys()
               for c in result["per_class"]):
        return "per_class entries lack class/precision/recall/f1/support"
    return None


def weights_tag(run):
    """Weights as in the cache name: IMAGENET1K_V1, random, or file-<sha256 prefix>."""
    sha = run.get("weights_sha256") or ""
    return f"file-{sha[:8]}" if run["weights"] == "file" and isinstance(sha, str) and sha else run["weights"]


def weights_label(run):
    return "random (untrained)" if run["weights"] == "random" else weights_tag(run)


def sort_key(run):
    depth = run.get("depth")
    depth = depth if isinstance(depth, int) and not isinstance(depth, bool) else math.inf  # unknown: last
    return run["dataset"], run["model"], weights_tag(run), run["head"], depth, run["layer"]


def best_run(runs):
    """The run with the highest validation accuracy; ties go to a sweep's chosen layer, then the first."""
    return max(runs, key=lambda run: (run["val_accuracy"], bool(run.get("chosen"))))  # max keeps the first of equals


def depth_groups(runs):
    """(dataset, model, weights, head) -> its runs, for groups with 2+ layers."""
    groups = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["model"], weights_tag(run), run["head"]), []).append(run)
    return {key: group for key, group in groups.items() if len({r["layer"] for r in group}) >= 2}


def write_runs_json(path, runs):
    rows = []
    for run in runs:
        row = {key: run.get(key) for key in RUN_FIELDS}
        if "chosen" in run:
            row["chosen"] = run["chosen"]
        rows.append(row)
    Path(path).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def _cells(run):
    """One run as the table's cells (COLUMNS), as text."""
    return [run["dataset"], run["model"], weights_label(run), run["layer"], run["head"], str(run["dim"]),
            str(run["n_train"]), str(run["n_val"]), str(run["n_test"]), f"{run['C']:.3g}",
            f"{run['val_accuracy']:.4f}", f"{run['test_accuracy']:.4f}", f"{run['test_balanced_accuracy']:.4f}",
            f"{run['test_macro_f1']:.4f}", "yes" if run.get("chosen") is True else ""]


def _class_cells(run):
    return [[str(c["class"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])]
            for c in run["per_class"]]


def _md(header, rows):
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header))] + [line(row) for row in rows])


def markdown_table(runs):
    return _md(COLUMNS, [_cells(run) for run in runs])


def text_table(runs, warnings=()):
    """Fixed-width table for the terminal; text columns left-aligned, numbers right; warnings below."""
    rows = [list(COLUMNS)] + [_cells(run) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row):
        return "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]] + list(warnings))


def _title(run):
    return f"{run['dataset']}: {run['model']}, {weights_label(run)}"


def plot_confusion(run, path):
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
    ax.set_title(f"{_title(run)}\n{run['layer']}, {run['head']}: test accuracy {run['test_accuracy']:.3f}", fontsize=10)
    return _save(fig, path)


def plot_depth(runs, path):
    """Val and test accuracy against layer depth for one group; the chosen layer starred."""
    runs = sorted(runs, key=sort_key)
    x = np.arange(len(runs))
    val = [r["val_accuracy"] for r in runs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(runs) + 2), 4))
    ax.plot(x, val, "o-", label="val")
    ax.plot(x, [r["test_accuracy"] for r in runs], "s--", label="test")
    marked = [r for r in runs if r.get("chosen") is True] or [best_run(runs)]
    at = runs.index(marked[0])
    ax.plot(at, val[at], "*", markersize=18, color="gold", markeredgecolor="black",
            label=f"chosen: {runs[at]['layer']}")
    ax.set_xticks(x, [r["layer"] for r in runs], rotation=30, ha="right")
    ax.set_xlabel("layer (input side to output side)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{_title(runs[0])}, {runs[0]['head']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _image_table(run, data_dir):
    """The run's data set, from where it was extracted if that folder is still there."""
    from .datasets import load_dataset

    root = run.get("dataset_root")
    if isinstance(root, str) and root and Path(root).is_dir():
        return load_dataset(Path(root).name, Path(root).parent)
    if run.get("layout") == "digits":
        return load_dataset("digits")
    return load_dataset(run["dataset"], data_dir)


def thumbnail_strip(run, data_dir, path, limit=STRIP_SIZE):
    """Up to `limit` misclassified test images with true and predicted labels -> one PNG.
    Returns None when written, else a one-line reason it was not."""
    wrong = [m for m in run.get("misclassified") or [] if isinstance(m, dict) and "id" in m]
    if not wrong:
        return "no misclassified test images listed"
    try:
        table = _image_table(run, data_dir)
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


def _file_name(*parts):
    return "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", str(p)) for p in parts) + ".png"


def _html_table(header, rows, classes=()):
    """An HTML table, every cell escaped; `classes` gives each body row a CSS class ("" for none)."""
    classes = list(classes) + [""] * (len(rows) - len(classes))
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row, css in zip(rows, classes):
        cells = "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
        lines.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return "\n".join(lines + ["</table>"])


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(-n+5),th{text-align:left}
tr.random{background:#fde8e8;color:#777}tr.chosen{font-weight:bold}img{max-width:100%;margin:0.5em 0}
.note{color:#a33}"""


def checks_text(checks):
    """The data checks of a cache (see pipeline.checks) as (paragraph, [list items])."""
    if not checks:
        return "No data checks recorded (a head trained before they existed).", []
    head = (f"{checks['n_skipped']} images skipped; {checks['n_duplicate_groups']} groups of byte-identical images "
            f"({checks['n_duplicate_images']} images): {checks['n_groups_across_splits']} span splits "
            f"({checks['n_eval_images_seen_in_train']} val/test images also in train), "
            f"{checks['n_groups_conflicting_labels']} with conflicting labels.")
    items = [f"skipped {s['id']}: {s['reason']}" for s in checks["skipped"]]
    items += [("labels disagree: " if g["conflicting_labels"] else "across splits: ")
              + ", ".join(f"{i} ({label}, {split})" for i, label, split in zip(g["ids"], g["labels"], g["splits"]))
              for g in checks["groups"]]
    return head, items


def write_html(path, runs, sections, warnings=()):
    """Self-contained page: the runs table, then per data set its best run's plots and tables."""
    rows_class = ["random" if r["weights"] == "random" else "chosen" if r.get("chosen") is True else "" for r in runs]
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Trained heads</title><style>{CSS}</style>"
             "</head><body><h1>Trained heads</h1>",
             "<p>Best run per data set: highest <em>validation</em> accuracy. Rows on random (untrained) weights are "
             "greyed: their accuracy is only a floor.</p>",
             _html_table(COLUMNS, [_cells(r) for r in runs], rows_class)]
    parts += [f"<p class=\"note\">{html.escape(w)}</p>" for w in warnings]
    for s in sections:
        best = s["best"]
        parts.append(f"<h2>{html.escape(best['dataset'])}</h2><p>Best on val: {html.escape(best['model'])}, "
                     f"{html.escape(weights_label(best))}, {html.escape(best['layer'])}, {html.escape(best['head'])}: "
                     f"val {best['val_accuracy']:.4f}, test {best['test_accuracy']:.4f}.</p>")
        parts.append(_img(s["confusion"], "confusion matrix"))
        parts.append(_html_table(CLASS_COLUMNS, _class_cells(best)))
        for depth_png in s["depth"]:
            parts.append("<h3>Accuracy against depth</h3>" + _img(depth_png, "accuracy against depth"))
        text, items = checks_text(best.get("data_checks"))
        parts.append(f"<h3>Data checks</h3><p>{html.escape(text)}</p>")
        if items:
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>")
        parts.append("<h3>Misclassified test images</h3>")
        parts.append(_img(s["strip"], "misclassified test images") if s["strip"]
                     else f"<p class=\"note\">No thumbnails: {html.escape(s['strip_note'])}.</p>")
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts) + "\n", encoding="utf-8")
    return Path(path)


def _img(png, alt):
    return f"<p><img src=\"{html.escape(Path(png).name)}\" alt=\"{html.escape(alt)}\"></p>"


def write_markdown(path, runs, sections, warnings=()):
    lines = ["# Trained heads", "", markdown_table(runs), ""] + [f"- {w}" for w in warnings]
    for s in sections:
        best = s["best"]
        lines += ["", f"## {best['dataset']}", "",
                  f"Best on val: {best['model']}, {weights_label(best)}, {best['layer']}, {best['head']} "
                  f"(val {best['val_accuracy']:.4f}, test {best['test_accuracy']:.4f}).", "",
                  _md(CLASS_COLUMNS, _class_cells(best))]
        text, items = checks_text(best.get("data_checks"))
        lines += ["", "### Data checks", "", text, ""] + [f"- {item}" for item in items]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def write_report(features_dir="features", reports_dir="reports", data_dir="data"):
    """Read every result, write runs.json, report.md, index.html and PNGs -> (terminal table, paths)."""
    runs, warnings = collect_runs(features_dir)
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_runs_json(out / "runs.json", runs)]
    sections = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        own = [r for r in runs if r["dataset"] == dataset]
        best = best_run(own)
        section = {"best": best, "confusion": plot_confusion(best, out / _file_name(dataset, "confusion")),
                   "depth": [plot_depth(group, out / _file_name(*key, "depth"))
                             for key, group in depth_groups(own).items()]}
        strip = out / _file_name(dataset, "misclassified")
        section["strip_note"] = thumbnail_strip(best, data_dir, strip)
        if section["strip_note"]:
            strip.unlink(missing_ok=True)  # no stale strip from an earlier report
        section["strip"] = None if section["strip_note"] else strip
        paths += [section["confusion"], *section["depth"]] + ([strip] if section["strip"] else [])
        sections.append(section)
    paths.append(write_markdown(out / "report.md", runs, sections, warnings))
    paths.append(write_html(out / "index.html", runs, sections, warnings))
    return text_table(runs, warnings), paths
