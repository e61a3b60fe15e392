"""The layer sweep: which layer of the backbone suits this data set, measured on val.

    results, chosen, extracted = run_sweep(table, backbone, "features", head="softmax")

Extracts every standard tap of the model (early to penultimate) in one forward
pass per image, trains the head on each layer with the usual protocol, and
chooses the layer with the best VALIDATION accuracy (ties: the deeper layer).
Test accuracy is computed for every layer for the report but never consulted.
The choice is kept in its own record beside the cache (store.results.SweepRecord), one
per pooling, where `train-head --layer auto` and the report find it: with sweeps of
several poolings, the best on val among their choices.
"""
from .errors import CacheError
from .extract import extract_features
from .paths import sweep_record_path, sweep_record_paths
from .store import read_cache_identity, read_sweep_record, sweep_made_before_cache, sweeps_choice, write_json
from .train import train_head

CRITERION = "val_accuracy (ties: deeper layer); test never used to choose"


def standard_layers(backbone, pooling="avg"):
    """Named taps from early to penultimate, as layer specs (the alias and VGG's spatial avgpool left out)."""
    taps = [t for t in backbone.taps() if t != "penultimate"]
    layers = backbone.resolve(taps + ["penultimate"], default_pooling=pooling)  # vector taps: none
    return [layer.name for layer in layers if not layer.name.startswith("avgpool:")]


def run_sweep(table, backbone, features_dir, head="softmax", pooling="avg", on_layer=None, **extract_options):
    """Extract all standard layers, fit `head` on each, choose by val -> (results, chosen layer, extract result)."""
    layers = standard_layers(backbone, pooling)
    extracted = extract_features(table, backbone, layers, features_dir, **extract_options)
    results = []
    for layer in layers:
        results.append(train_head(extracted.path, layer, head))
        if on_layer:
            on_layer(results[-1])
    chosen = max(results, key=lambda r: (r["val_accuracy"], r["depth"]))["layer"]
    _, codes, splits, _ = read_cache_identity(extracted.path)
    write_json(sweep_record_path(extracted.path, head, pooling), {
        "cache": str(extracted.path), "head": head, "pooling": pooling, "chosen": chosen, "criterion": CRITERION,
        "layers": [{k: r[k] for k in ("layer", "dim", "C", "val_accuracy", "test_accuracy")} for r in results],
        "cache_key": codes, "split_key": splits})
    return results, chosen, extracted


def chosen_layer(cache_file, head):
    """The layer the sweeps of this cache and head chose (for `train-head --layer auto`): with one sweep per
    pooling, the best on val among their choices (store.sweeps_choice)."""
    paths = sweep_record_paths(cache_file, head)
    if not paths:
        raise CacheError(f"no layer sweep recorded for {cache_file} with head {head} "
                         f"({sweep_record_path(cache_file, head)}); run `make sweep HEAD={head}` with this DATASET, "
                         "MODEL and WEIGHTS first, or give LAYER=<name>")
    records = []
    for path in paths:
        try:
            record = read_sweep_record(path)
        except ValueError as e:
            raise CacheError(f"{path}: unusable sweep record ({e}); run `make sweep` again") from None
        if not sweep_made_before_cache(record, path):
            records.append(record)
    if not records:
        raise CacheError(f"{paths[0]}: the layer sweep chose on {cache_file} before it was made again (other data, "
                         f"splits or codes); run `make sweep HEAD={head}` with this DATASET, MODEL and WEIGHTS again, "
                         f"or give LAYER=<name>")
    return sweeps_choice(records)
