"""Compare every trained head: runs.json, report.md, index.html and their PNGs.

    from pipeline.report import write_report
    table, paths = write_report("features", "reports", "data")
    print(table)   # the same runs as a fixed-width table, then any skipped files

Reads only the result JSON that `train.train_head` writes next to each head
(store.results.HeadResult), the sweeps' records and each cache's identity (a head
whose cache was made again of other data, splits or codes is stale); nothing is unpickled
and torch is never imported. The best run of a data set is the one with the highest *validation*
accuracy among runs that are not stale, on trained weights (random weights are a
floor, chosen only when there is nothing else; ties: a sweep's chosen layer, then the
first in sort order); test accuracy is reported, never used to choose.
Runs on random weights are labelled "random (untrained)" wherever weights show.
"""
import functools
import html
import json
import math
import re
from datetime import datetime
from pathlib import Path

from .checks import count
from .errors import PipelineError
from .paths import result_files, sweep_record_files, weights_tag
from .plots import plot_confusion, plot_depth, thumbnail_strip
from .store import (cache_identity_in, read_cache_identity, read_result, read_sweep_record,
                    sweep_made_before_cache, sweeps_choice)

RUN_FIELDS = ("dataset", "model", "weights", "weights_sha256", "layer", "depth", "pooling", "head", "dim",
              "n_train", "n_val", "n_test", "C", "val_accuracy", "test_accuracy", "test_balanced_accuracy",
              "test_macro_f1", "solver", "select_rows", "streamed", "seconds", "head_file", "result_file")
COLUMNS = ("dataset", "model", "weights", "layer", "head", "dim", "train", "val", "test", "C",
           "val acc", "test acc", "balanced acc", "macro-F1", "chosen", "seconds", "C chosen on")
CLASS_COLUMNS = ("class", "precision", "recall", "F1", "support")


def collect_runs(features_dir):
    """Every usable result under FEATURES_DIR/*/heads/ -> (runs in sort order, warnings). A run is its
    HeadResult plus `result_file` and `chosen` (whether a sweep chose its layer)."""
    identity = functools.lru_cache(maxsize=None)(read_cache_identity)  # each cache read once
    chosen = _sweep_choices(features_dir, identity)
    runs, warnings, stale = [], [], {}
    for path in result_files(features_dir):
        try:
            result = read_result(path)
        except ValueError as e:
            warnings.append(f"warning: skipped {path}: {e}")
            continue
        sweep = chosen.get((str(Path(path).parent.parent / Path(str(result.get("cache"))).name), result["head"]))
        runs.append({**result, "result_file": str(path), **({"chosen": sweep == result["layer"]} if sweep else {})})
        if _made_again_since(result, path, identity):
            runs[-1]["stale"] = True
            stale.setdefault(str(result.get("cache")), []).append(f"{result['layer']} {result['head']}")
    if not runs:
        why = f" ({len(warnings)} unusable; {warnings[0][9:]})" if warnings else ""
        raise PipelineError(f"no trained heads under {features_dir}/*/heads{why}; run `make train-head` first")
    warnings += [f"warning: {cache} was made again, of other data, splits or codes, after these heads were trained "
                 f"on it: {', '.join(heads)}; they are marked stale and not chosen as best: train them again"
                 for cache, heads in stale.items()]
    return sorted(runs, key=sort_key), warnings


def _made_again_since(result, path, identity):
    """Whether the cache a head was trained on was made again after, of other data, splits or codes (an update, a
    rebuild with other settings, a rebuild that drew the splits again): its numbers are of something else. The
    cache is looked for beside the heads folder, then where the result says. Results written before `split_key`
    compare the rows of each split, those before `cache_key` the dates. `identity`: store.read_cache_identity,
    read once per cache."""
    found = cache_identity_in(Path(path).parent.parent, result.get("cache"), identity)
    if found is None:
        return False
    created, key, splits, sizes = found
    if isinstance(result.get("cache_key"), str):
        if key != result["cache_key"]:
            return True
        if isinstance(result.get("split_key"), str):
            return splits != result["split_key"]
        return any(result[f"n_{split}"] != rows for split, rows in sizes.items())
    try:
        return datetime.fromisoformat(created) > datetime.fromisoformat(str(result.get("created")))
    except (TypeError, ValueError):
        return False


def _sweep_choices(features_dir, identity):
    """{(cache, head): the layer its sweeps chose (store.sweeps_choice)}, from the readable sweep records of
    caches not made again since. A cache is named by its place under FEATURES_DIR, as a head's result finds it
    (beside its heads folder), whatever path the sweep and the head were given."""
    records = {}
    for path in sweep_record_files(features_dir):
        try:
            record = read_sweep_record(path)
        except ValueError:
            continue
        if not sweep_made_before_cache(record, path, identity):  # a choice on an older cache chooses nothing now
            cache = Path(path).parent / Path(str(record.get("cache"))).name
            records.setdefault((str(cache), str(record.get("head"))), []).append(record)
    return {key: sweeps_choice(found) for key, found in records.items()}


def run_weights_tag(run):
    """Weights as in the cache name: IMAGENET1K_V1, random, or file-<sha256 prefix>."""
    sha = run.get("weights_sha256")
    return weights_tag(run["weights"], sha if isinstance(sha, str) else "")


def weights_label(run):
    return "random (untrained)" if run["weights"] == "random" else run_weights_tag(run)


def sort_key(run):
    depth = run.get("depth")
    depth = depth if isinstance(depth, int) and not isinstance(depth, bool) else math.inf  # unknown: last
    return run["dataset"], run["model"], run_weights_tag(run), run["head"], depth, run["layer"]


def best_run(runs):
    """The run with the highest validation accuracy, on trained weights where there are any (a random-weights
    run's lucky val score on a few images is no model to show); ties go to a sweep's chosen layer, then the first."""
    return max(runs, key=lambda run: (not run.get("stale"), run["weights"] != "random", run["val_accuracy"],
                                      bool(run.get("chosen"))))


def depth_groups(runs):
    """(dataset, model, weights, head) -> its runs, for groups with 2+ layers."""
    groups = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["model"], run_weights_tag(run), run["head"]), []).append(run)
    return {key: group for key, group in groups.items() if len({r["layer"] for r in group}) >= 2}


def write_runs_json(path, runs):
    rows = []
    for run in runs:
        row = {key: run.get(key) for key in RUN_FIELDS}
        row.update({key: run[key] for key in ("chosen", "stale") if key in run})
        rows.append(row)
    Path(path).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def _cells(run):
    """One run as the table's cells (COLUMNS), as text."""
    return [run["dataset"], run["model"], weights_label(run), run["layer"],
            run["head"] + (" (stale)" if run.get("stale") else ""), str(run["dim"]),
            str(run["n_train"]), str(run["n_val"]), str(run["n_test"]), f"{run['C']:.3g}",
            f"{run['val_accuracy']:.4f}", f"{run['test_accuracy']:.4f}", f"{run['test_balanced_accuracy']:.4f}",
            f"{run['test_macro_f1']:.4f}", "yes" if run.get("chosen") is True else "", _number(run.get("seconds"), ".1f"),
            _selection(run)]


def _number(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _selection(run):
    """How many train rows C was chosen on: "train", or "10000 of 42041" for a subsample."""
    rows = run.get("select_rows")
    if not isinstance(rows, int) or isinstance(rows, bool):
        return ""
    return "train" if rows >= run["n_train"] else f"{rows} of {run['n_train']}"


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


def _plot_depth(group, path):
    """A group's accuracy against depth, its chosen layer (or its best on val) starred."""
    group = sorted(group, key=sort_key)
    chosen = next((r for r in group if r.get("chosen") is True), None) or best_run(group)
    return plot_depth(group, chosen, f"{_title(group[0])}, {group[0]['head']}", path)


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
    head = (f"{count(checks['n_skipped'], 'image')} skipped; {count(checks['n_duplicate_groups'], 'group')} of "
            f"byte-identical images ({count(checks['n_duplicate_images'], 'image')}): "
            f"{checks['n_groups_across_splits']} across splits "
            f"({count(checks['n_eval_images_seen_in_train'], 'val/test image')} also in train), "
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
             "<p>Best run per data set: highest <em>validation</em> accuracy on trained weights. Rows on random "
             "(untrained) weights are greyed: their accuracy is only a floor.</p>",
             _html_table(COLUMNS, [_cells(r) for r in runs], rows_class)]
    parts += [f"<p class=\"note\">{html.escape(w)}</p>" for w in warnings]
    for s in sections:
        best = s["best"]
        parts.append(f"<h2>{html.escape(best['dataset'])}</h2><p>Best on val: {html.escape(best['model'])}, "
                     f"{html.escape(weights_label(best))}, {html.escape(best['layer'])}, {html.escape(best['head'])}: "
                     f"val {best['val_accuracy']:.4f}, test {best['test_accuracy']:.4f}.</p>"
                     + (f"<p>Trained by {html.escape(str(best['solver']))}.</p>" if best.get("solver") else ""))
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
    for dataset in dict.fromkeys(r["dataset"] for r in runs if not r.get("stale")):  # a stale head is never shown
        own = [r for r in runs if r["dataset"] == dataset and not r.get("stale")]       # as a data set's best
        best = best_run(own)
        section = {"best": best, "confusion": plot_confusion(best, _title(best), out / _file_name(dataset, "confusion")),
                   "depth": [_plot_depth(group, out / _file_name(*key, "depth"))
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
