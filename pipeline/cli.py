"""Command line: `python -m pipeline COMMAND --help`. Parses, calls one function, echoes.

    python -m pipeline extract --dataset vehicles --model mobilenet_v2 --weights weights.pth
    python -m pipeline train-head --head svm --dataset vehicles
    python -m pipeline report
    python -m pipeline predict features/vehicles/heads/<...>.svm.h5 photos/ --out predictions.csv

Every PipelineError becomes one line on stderr and exit status 1; every PipelineWarning one
line on stderr, and the run goes on.
"""
import os
import sys
import warnings
from pathlib import Path, PurePath

import click

from .errors import PipelineError, PipelineWarning
from .plan import PRECISIONS
from .store import HEADS

PATH = click.Path(path_type=Path)


class Bytes(click.ParamType):
    """A size: 1073741824, 512M, 4G (powers of 1024)."""
    name = "bytes"

    def convert(self, value, param, ctx):
        text = str(value).strip().upper().removesuffix("B")
        power = " KMGT".index(text[-1]) if text[-1:] in ("K", "M", "G", "T") else 0
        try:
            return int(float(text.rstrip("KMGT")) * 1024 ** power)
        except ValueError:
            self.fail(f"{value!r} is not a size; give bytes, or a number with K, M, G or T (e.g. 4G)", param, ctx)


def dataset_name(ctx, param, value):
    """A data set's folder name under --data-dir (a trailing slash dropped: the same cache), not a path."""
    text = str(value).rstrip("/\\")
    path = PurePath(text)
    if text in ("", ".", "..") or len(path.parts) > 1:
        where = str(path.parent) if path.is_absolute() else f"<DATA_DIR>/{path.parent}"
        raise PipelineError(f"DATASET={value} is a path; a data set is named by its folder under DATA_DIR (caches "
                            f"and heads are filed by that name): give DATA_DIR={where} DATASET={path.name}")
    return text


BYTES = Bytes()
HEAD = click.Choice(sorted(HEADS))
PRECISION = click.Choice(PRECISIONS)


class Group(click.Group):
    def invoke(self, ctx):
        warnings.formatwarning = _warning_line
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            raise click.ClickException(str(e)) from None


def _warning_line(message, category, filename, lineno, line=None, _python=warnings.formatwarning):
    if issubclass(category, PipelineWarning):
        return f"warning: {message}\n"
    return _python(message, category, filename, lineno, line)


@click.group(cls=Group)
def cli():
    """Transfer learning by feature cache: extract CNN codes once, train heads in seconds."""


def _engine_options(f):
    f = click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this process; ray: a Ray cluster (pip install -e '.[ray]').")(f)
    f = click.option("--ray-address", default=None, help="The cluster to join: auto, host:port (default: "
                     "RAY_ADDRESS, else a Ray started on this machine for the run).")(f)
    f = click.option("--ray-data", type=click.Choice(["shared", "driver"]), default="shared", show_default=True,
                     help="shared: every node reads the images' path; driver: they are on this machine only, "
                          "which reads the bytes and ships them.")(f)
    return f


def _decode_option(f):
    return click.option("--decode", type=click.Choice(["cpu", "device"]), default="cpu", show_default=True,
                        help="cpu: the workers decode (PIL); device: JPEGs decoded where the model runs, nvJPEG on "
                             "a GPU (pip install -e '.[gpu]').")(f)


def _compile_option(f):
    return click.option("--compile", "compiled", is_flag=True,
                        help="Run the model through torch.compile (the same codes within rounding). Compiling adds "
                             "start-up; it is meant for long runs on a GPU (README: Compiling the model). A CPU "
                             "needs a C++ compiler.")(f)


def _duplicates_option(f):
    return click.option("--drop-duplicates/--keep-duplicates", default=None,
                        help="Leave out byte-identical images (all of a group whose labels disagree) before splitting, "
                             "or keep them. Default: as the cache was made (kept in a new one); a change is an "
                             "update.")(f)


def _refresh_options(f):
    f = click.option("--rebuild", is_flag=True, help="Start the cache over, whatever is there.")(f)
    return click.option("--update", is_flag=True, help="The data set changed: extract only new and changed images, "
                                                      "keep the rest.")(f)


def _check_refresh(update, rebuild):
    if update and rebuild:
        raise click.UsageError("--update and --rebuild exclude each other: choose one")


def _data_options(f):
    f = click.option("--data-dir", type=PATH, default=Path("data"), show_default=True, help="Folder holding data sets.")(f)
    f = click.option("--features-dir", type=PATH, default=Path("features"), show_default=True, help="Where caches go.")(f)
    return f


@cli.command()
@click.option("--dataset", callback=dataset_name, default="vehicles", show_default=True,
              help="Folder under --data-dir, or `digits`.")
@click.option("--model", default="vgg16", show_default=True, help="Any torchvision classifier (`pipeline models`).")
@click.option("--layers", default="penultimate", show_default=True,
              help="Comma-separated taps, each optionally :avg|:max|:avgmax|:gridK (`pipeline taps MODEL`).")
@click.option("--weights", default="default", show_default=True, help="default (torchvision), none (random) or a .pth path.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--precision", type=PRECISION, default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 32 on CPU, 256 on GPU.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes (default: none on CPU, where threads decode between forward passes; every core but one, at most 32, on GPU).")
@_decode_option
@_compile_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_refresh_options
@_duplicates_option
@_engine_options
@_data_options
def extract(dataset, model, layers, weights, device, precision, batch_size, workers, decode, compiled, quiet, update,
            rebuild, drop_duplicates, engine, ray_address, ray_data, data_dir, features_dir):
    """Stage one: cache a frozen CNN's codes for every image of a data set."""
    from .backbones import load_backbone
    from .datasets import load_dataset
    from .extract import check_engine_options, duplicates_rule, extract_features

    _check_refresh(update, rebuild)
    check_engine_options(engine, device, workers, decode, compiled)
    table = load_dataset(dataset, data_dir, drop_duplicates=duplicates_rule(features_dir, dataset, model, weights,
                                                                            drop_duplicates))
    backbone = load_backbone(model, weights)
    try:
        result = extract_features(table, backbone, _split(layers), features_dir, device=device, precision=precision,
                                  batch_size=batch_size, num_workers=workers, progress=not quiet,
                                  update=update, rebuild=rebuild, engine=engine, ray_address=ray_address,
                                  ray_data=ray_data, decode=decode, compiled=compiled)
    except KeyboardInterrupt:
        from .paths import cache_path
        from .store import partial_progress
        done, total = partial_progress(cache_path(features_dir, table.name, backbone.name, backbone.weights_tag))
        saved = f"{done} of {total} images are saved" if done is not None else "nothing was saved yet"
        click.echo(f"interrupted: {saved}; re-run the same command to resume", err=True)
        sys.exit(130)
    click.echo(result.message)


@cli.command("train-head")
@click.option("--head", type=HEAD, default="softmax", show_default=True)
@click.option("--dataset", callback=dataset_name, default="vehicles", show_default=True)
@click.option("--model", default=None,
              help="Default: the only (or newest) cache of the data set; with --weights, the one made with them.")
@click.option("--weights", default=None, help="default, none or a .pth path, as given to extract; without --model, "
                                              "the one model whose cache of the data set was made with them.")
@click.option("--layer", default="penultimate", show_default=True, help="A cached layer, `penultimate`, or `auto` (the sweep's choice).")
@click.option("--solver", type=click.Choice(["auto", "torch", "sklearn"]), default="auto", show_default=True,
              help="torch: L-BFGS per C in memory, every C at once when streamed; sklearn: scikit-learn's exact fit per C, in memory; "
                   "auto: sklearn for softmax on small layers, else torch.")
@click.option("--memory-budget", type=BYTES, default=None,
              help="Bytes (512M, 4G) a layer may take in memory; above it the head streams (default: a quarter of RAM).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_data_options
def train_head(head, dataset, model, weights, layer, solver, memory_budget, quiet, data_dir, features_dir):
    """Stage two: choose C on val, refit on train+val, score test once, save the head."""
    from tqdm import tqdm

    from .checks import note
    from .paths import find_cache
    _threads_sleep_when_waiting()
    from .train import train_head as train

    if weights:
        from .backbones import classification_models
        from .paths import find_cache_made_with
        from .weights import weights_tag
        cache, which = find_cache_made_with(features_dir, dataset, model, weights,
                                            lambda m: weights_tag(m, weights), classification_models())
    else:
        cache, which = find_cache(features_dir, dataset, model)
    if which:
        click.echo(which)
    if layer == "auto":
        from .sweep import chosen_layer
        layer = chosen_layer(cache, head)
    with tqdm(unit="row", unit_scale=True, disable=quiet, dynamic_ncols=True, leave=False) as bar:
        result = train(cache, layer, head, solver=solver, memory_budget=memory_budget, progress=None if quiet else bar)
    click.echo(f"{result['head']} on {result['layer']} ({result['dim']}-D, C={result['C']:.3g}): "
               f"val {result['val_accuracy']:.4f}, test {result['test_accuracy']:.4f} "
               f"(balanced {result['test_balanced_accuracy']:.4f}, macro-F1 {result['test_macro_f1']:.4f}) "
               f"in {result['seconds']:.1f} s -> {result['head_file']}\n  solver: {result['solver']}")
    if note(result["data_checks"]):
        click.echo(note(result["data_checks"]))


@cli.command()
@click.option("--dataset", callback=dataset_name, default="vehicles", show_default=True)
@click.option("--model", default="vgg16", show_default=True)
@click.option("--weights", default="default", show_default=True, help="default, none or a .pth path.")
@click.option("--head", type=HEAD, default="softmax", show_default=True)
@click.option("--pooling", default="avg", show_default=True, help="For spatial layers: avg, max, avgmax or gridK "
                                                                  "(taps that are already vectors keep theirs).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=PRECISION, default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--workers", type=click.IntRange(min=0), default=None)
@_decode_option
@_compile_option
@click.option("--reports-dir", type=PATH, default=Path("reports"), show_default=True)
@click.option("--quiet", is_flag=True)
@_refresh_options
@_duplicates_option
@_engine_options
@_data_options
def sweep(dataset, model, weights, head, pooling, device, precision, batch_size, workers, decode, compiled, reports_dir,
          quiet, update, rebuild, drop_duplicates, engine, ray_address, ray_data, data_dir, features_dir):
    """Extract every standard tap, train HEAD on each, choose the layer on val, write the report."""
    _threads_sleep_when_waiting()  # its heads run in this process, after the forward passes
    from .backbones import load_backbone
    from .datasets import load_dataset
    from .extract import check_engine_options, duplicates_rule
    from .report import write_report
    from .sweep import chosen_layer, run_sweep

    _check_refresh(update, rebuild)
    check_engine_options(engine, device, workers, decode, compiled)
    table = load_dataset(dataset, data_dir, drop_duplicates=duplicates_rule(features_dir, dataset, model, weights,
                                                                            drop_duplicates))
    backbone = load_backbone(model, weights)
    show = lambda r: click.echo(f"  {r['layer']:<20} {r['dim']:>6}-D  val {r['val_accuracy']:.4f}  test {r['test_accuracy']:.4f}")
    results, chosen, extracted = run_sweep(table, backbone, features_dir, head, pooling, on_layer=show, device=device,
                                           precision=precision, batch_size=batch_size, num_workers=workers,
                                           progress=not quiet, update=update, rebuild=rebuild, engine=engine,
                                           ray_address=ray_address,
                                           ray_data=ray_data, decode=decode, compiled=compiled)
    again = (f"DATASET={dataset} MODEL={model}" + ("" if weights == "default" else f" WEIGHTS={weights}")
             + ("" if features_dir == Path("features") else f" FEATURES_DIR={features_dir}"))
    overall = chosen_layer(extracted.path, head)
    uses = "uses it" if overall == chosen else f"takes {overall}, the best on val of this cache's sweeps (other poolings)"
    click.echo(f"{extracted.message}\nchosen on val: {chosen} (`make train-head {again} LAYER=auto HEAD={head}` {uses})")
    write_report(features_dir, reports_dir, data_dir)
    click.echo(f"report: {reports_dir / 'index.html'}")


@cli.command()
@click.option("--features-dir", type=PATH, default=Path("features"), show_default=True)
@click.option("--reports-dir", type=PATH, default=Path("reports"), show_default=True)
@click.option("--data-dir", type=PATH, default=Path("data"), show_default=True, help="For thumbnails of misclassified images.")
def report(features_dir, reports_dir, data_dir):
    """Compare every trained head: reports/report.md, index.html, runs.json."""
    from .report import write_report

    table, paths = write_report(features_dir, reports_dir, data_dir)
    click.echo(table)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@cli.command()
@click.argument("head_file", type=PATH)
@click.argument("inputs", type=PATH, nargs=-1, required=True)
@click.option("--out", type=PATH, default=Path("predictions.csv"), show_default=True)
@click.option("--weights", default=None, help="Backbone weights if not where the head was trained (default, none, path).")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@_compile_option
@_engine_options
def predict(head_file, inputs, out, weights, device, batch_size, compiled, engine, ray_address, ray_data):
    """Classify image files or folders with the head's backbone; write path,label,score,skipped (an unreadable
    file gets no label and its reason)."""
    from .extract import check_engine_options
    from .predict import predict_files

    check_engine_options(engine, device, compiled=compiled)
    n, skipped = predict_files(head_file, inputs, out, weights=weights, device=device, batch_size=batch_size,
                               engine=engine, compiled=compiled, ray_address=ray_address, ray_data=ray_data)
    click.echo(f"classified {n} image{'s' * (n != 1)} -> {out}"
               + (f" ({skipped} skipped, listed with the reason)" if skipped else ""))


@cli.command()
@click.argument("model")
@click.option("--all", "all_nodes", is_flag=True, help="Also list every graph node.")
def taps(model, all_nodes):
    """List MODEL's named taps with their graph node and output shape (--all: every graph node too)."""
    from .backbones import load_backbone

    backbone = load_backbone(model, "none")
    named = backbone.taps()
    shapes = backbone.output_shapes(sorted(set(named.values()), key=list(named.values()).index))
    for tap, node in named.items():
        click.echo(f"{tap:<16} node {node:<24} output {list(shapes[node])}")
    if all_nodes:
        click.echo("\n".join(backbone.nodes()))


@cli.command()
@click.argument("pattern", default="*")
def models(pattern):
    """List torchvision classification models (optionally matching a wildcard)."""
    import fnmatch

    from .backbones import classification_models

    found = [m for m in classification_models() if fnmatch.fnmatch(m, pattern)]
    if not found:
        raise click.ClickException(f"no torchvision classification model matches {pattern!r}; "
                                   "`pipeline models` lists them all (wildcards: 'resnet*')")
    click.echo("\n".join(found))


def _threads_sleep_when_waiting():
    """A head runs many short parallel steps: torch's OpenMP threads spinning between them take the cores from
    any other process, so on a busy machine a head ran 3-30x slower (README: Stage two on a busy machine);
    sleeping, 1.3-1.5x. Before torch is imported (libgomp reads it once); the user's own setting wins.
    Stage one alone keeps torch's default (sleeping cost its forward pass 2-7%)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _split(text):
    return [part.strip() for part in text.split(",") if part.strip()]


def main():
    cli(prog_name="pipeline")


if __name__ == "__main__":
    sys.exit(main())
