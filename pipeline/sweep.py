"""The layer sweep: which layer of the backbone suits this data set, measured on val.

    results, chosen = sweep("pneumoniamnist", "mobilenet_v2", weights, head="softmax")

Extracts every standard tap of the model (early to penultimate) in one forward
pass per image, trains the head on each layer with the usual protocol, and
chooses the layer with the best VALIDATION accuracy (ties: the deeper layer).
Test accuracy is computed for every layer for the report but never consulted.
The choice is recorded next to the cache, where `train-head --layer auto` finds it.
"""
import json
from pathlib import Path

from .errors import CacheError
from .extract import extract_features
from .heads import head_paths, train_head


def standard_layers(backbone, pooling="avg"):
    """Named taps from early to penultimate, as layer specs (the alias and VGG's spatial avgpool left out)."""
    taps = [t for t in backbone.taps() if t != "penultimate"]
    layers = backbone.resolve([f"{t}:{pooling}" for t in taps] + ["penultimate"])
    return [layer.name for layer in layers if not layer.name.startswith("avgpool:")]


def sweep_record_path(cache_file, head):
    cache_file = Path(cache_file)
    return cache_file.with_name(f"{cache_file.stem}.sweep-{head}.json")


def run_sweep(table, backbone, features_dir, head="softmax", pooling="avg", on_layer=None, **extract_options):
    """Extract all standard layers, fit `head` on each, choose by val -> (results, chosen layer, extract result)."""
    layers = standard_layers(backbone, pooling)
    extracted = extract_features(table, backbone, layers, features_dir, **extract_options)
    results = []
    for layer in layers:
        result = train_head(extracted.path, layer, head)
        results.append(result)
        if on_layer:
            on_layer(result)
    chosen = max(results, key=lambda r: (r["val_accuracy"], r["depth"]))["layer"]
    for result in results:
        result["chosen"] = result["layer"] == chosen
        Path(head_paths(Path(extracted.path).parent / "heads", extracted.path, result["layer"], head)[1]).write_text(
            json.dumps(result, indent=2))
    record = {"cache": str(extracted.path), "head": head, "pooling": pooling, "chosen": chosen,
              "criterion": "val_accuracy (ties: deeper layer); test never used to choose",
              "layers": [{k: r[k] for k in ("layer", "dim", "C", "val_accuracy", "test_accuracy")} for r in results]}
    sweep_record_path(extracted.path, head).write_text(json.dumps(record, indent=2))
    return results, chosen, extracted


def chosen_layer(cache_file, head):
    """The layer a sweep chose for this cache and head (for `train-head --layer auto`)."""
    path = sweep_record_path(cache_file, head)
    if not path.exists():
        raise CacheError(f"no layer sweep recorded for {cache_file} with head {head} ({path}); "
                         "run `make sweep` first, or give LAYER=<name>")
    try:
        return json.loads(path.read_text())["chosen"]
    except (ValueError, KeyError):
        raise CacheError(f"{path}: unreadable sweep record; run `make sweep` again") from None
