"""Where every file of the pipeline lives: one rule each, imported by both stages.

    FEATURES_DIR/<dataset>/<model>-<weights tag>.h5                        a feature cache
    FEATURES_DIR/<dataset>/<cache stem>.sweep-<head>[-<pooling>].json       a layer sweep's choice
    FEATURES_DIR/<dataset>/heads/<cache stem>.<layer>.<head>.h5 / .json     a head and its result

The weights tag names the weights a cache was made with: the torchvision weights
name (`IMAGENET1K_V1`), `random`, or `file-<sha256[:8]>` for a weights file.
No torch, no h5py: the report and the CLI use these rules too.
"""
import glob
from pathlib import Path

from .errors import PipelineError

__all__ = ["weights_tag", "cache_path", "find_cache", "find_cache_made_with", "head_paths", "sweep_record_path",
           "sweep_record_paths", "result_files", "sweep_record_files"]


def weights_tag(weights, sha256=""):
    """`weights` as recorded ("IMAGENET1K_V1", "random" or "file") -> the tag in cache names."""
    return f"file-{sha256[:8]}" if weights == "file" and sha256 else weights


def cache_path(features_dir, dataset, model, tag):
    return Path(features_dir) / dataset / f"{model}-{tag}.h5"


def find_cache(features_dir, dataset, model=None, tag=None):
    """The cache to train on -> (path, note). With model and tag: that one; else the only or newest
    cache of the data set (of `model`, when given), and a note saying which was taken."""
    folder = Path(features_dir) / dataset
    if model and tag:
        return cache_path(features_dir, dataset, model, tag), ""
    pattern = f"{model}-*.h5" if model else "*.h5"
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        partial = sorted(folder.glob(pattern + ".partial"))
        if partial:  # the cache reader explains how to resume
            return partial[0].with_suffix(""), ""
        what = f"model {model}" if model else "any model"
        raise PipelineError(f"no feature cache for {dataset} and {what} in {folder}; "
                            f"run `make extract DATASET={dataset}{' MODEL=' + model if model else ''}` first")
    note = f"using {found[-1]}" + (f" (newest of {len(found)}; pass MODEL= and WEIGHTS= to choose)"
                                   if len(found) > 1 else "")
    return found[-1], note


def find_cache_made_with(features_dir, dataset, model, weights, tag_of, models):
    """The cache of `model` made with `weights` -> (path, note); without `model`, that of the one model of
    `models` whose cache of the data set was made with them. `tag_of(model)`: the weights' tag for a model
    (weights.weights_tag)."""
    folder = Path(features_dir) / dataset
    there = sorted({p.name.removesuffix(".partial") for p in folder.glob("*.h5*")
                    if p.name.endswith((".h5", ".h5.partial"))})
    candidates = [model] if model else sorted({name.split("-", 1)[0] for name in there} & set(models))
    wanted = [cache_path(features_dir, dataset, m, tag_of(m)) for m in candidates]
    found = [path for path in wanted if path.name in there]  # a .partial one: the cache reader says how to resume
    if len(found) == 1:
        return found[0], "" if model else f"using {found[0]} (the cache made with WEIGHTS={weights})"
    listing = f"caches there: {', '.join(there)}" if there else f"no caches in {folder}"
    if found:
        raise PipelineError(f"{len(found)} models have caches of {dataset} made with WEIGHTS={weights} "
                            f"({', '.join(p.name for p in found)}); give MODEL= too")
    what = f"{wanted[0]}: no such feature cache" if model else f"{folder}: no feature cache made with WEIGHTS={weights}"
    raise PipelineError(f"{what} ({listing}); run `make extract DATASET={dataset} MODEL={model or '<model>'} "
                        f"WEIGHTS={weights}` first")


def head_paths(cache, layer, head, out_dir=None):
    """(head file, result JSON) of `head` trained on `layer` of the cache at `cache`."""
    cache = Path(cache)
    folder = Path(out_dir) if out_dir else cache.parent / "heads"
    stem = f"{cache.stem}.{layer.replace(':', '-')}.{head}"
    return folder / f"{stem}.h5", folder / f"{stem}.json"


def sweep_record_path(cache, head, pooling="avg"):
    """Where a layer sweep of `cache` with `head` keeps its choice: one record per pooling of the spatial
    taps (avg's name is the one every sweep had before), so that a sweep with another pooling adds to it."""
    cache = Path(cache)
    return cache.with_name(f"{cache.stem}.sweep-{head}{'' if pooling == 'avg' else '-' + pooling}.json")


def sweep_record_paths(cache, head):
    """The sweep records of `cache` with `head` that exist, avg's first."""
    cache = Path(cache)
    others = sorted(cache.parent.glob(f"{glob.escape(cache.stem)}.sweep-{head}-*.json"))
    return [path for path in [sweep_record_path(cache, head), *others] if path.exists()]


def result_files(features_dir):
    """Every head's result JSON under FEATURES_DIR, sorted."""
    return sorted(Path(features_dir).glob("*/heads/*.json"))


def sweep_record_files(features_dir):
    return sorted(Path(features_dir).glob("*/*.sweep-*.json"))
