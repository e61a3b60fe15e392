"""Backbones: a frozen torchvision classifier, its weights, its transforms, its taps.

    backbone = load_backbone("mobilenet_v2", "/path/weights.pth")   # or "default" / "none"
    taps = backbone.taps()                    # {"penultimate": "adaptive_avg_pool2d", "features.17": ...}
    layers = backbone.resolve(["penultimate", "features.17:max"])
    extractor = backbone.extractor(layers)    # one forward pass -> {layer name: tensor}

A layer is a tap (a named tap or any graph node, see `pipeline taps MODEL`) and a
pooling for spatial maps: `avg` (global average, the default), `max`, `avgmax`
(both, concatenated) or `gridK` (adaptive average to K x K, keeping layout). The
layer's name in the cache carries its pooling, e.g. `layer4:avg`; taps whose output
is already a vector (fc7, avgpool) keep their bare name.
"""
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .errors import ModelError, WeightsError

POOLINGS = ("avg", "max", "avgmax", "gridK")
_SKIP_BACK = (nn.Dropout, nn.Flatten, nn.Identity)  # no-ops in eval, walked over to find penultimate


@dataclass(frozen=True)
class Layer:
    """One requested layer: where to tap and how to pool."""
    name: str     # as stored in the cache: tap, or tap:pooling for spatial maps
    tap: str      # named tap or the user's node name
    node: str     # torchvision graph node
    pooling: str  # "none" for vectors, else one of POOLINGS with K filled in
    depth: int    # position of the node in the forward graph (for plots against depth)


@dataclass
class Backbone:
    """A frozen classifier in eval mode, with what is needed to reproduce its codes."""
    name: str
    model: nn.Module
    transform: nn.Module      # PIL image -> normalised tensor [3, H, W]
    weights: str              # "IMAGENET1K_V1", "random" or "file"
    weights_tag: str          # part of the cache file name
    weights_sha256: str       # of the weights file; "" for random weights
    weights_source: str       # URL, path, or "random init (seed 0)"

    @property
    def input_size(self):
        return int(self.transform.crop_size[0])

    def taps(self):
        """Named taps of this model -> graph node (see module docstring)."""
        return named_taps(self.model)

    def nodes(self):
        """Every graph node name, in forward order (eval mode)."""
        return get_graph_node_names(self.model)[1]

    def resolve(self, specs, default_pooling="avg"):
        """["penultimate", "conv5:max", ...] -> [Layer], named as in the cache, in forward order."""
        taps, nodes = self.taps(), self.nodes()
        layers = {}
        for spec in specs:
            tap, _, pooling = spec.partition(":")
            pooling = pooling or default_pooling
            check_pooling(pooling)
            node = taps.get(tap, tap if _in_graph(tap, nodes) else None)
            if node is None:
                raise ModelError(f"{self.name} has no tap {tap!r}; named taps: {', '.join(taps)} "
                                 f"(graph nodes too: `pipeline taps {self.name}` lists them all)")
            layers[(node, pooling)] = _canonical_tap(taps, tap, node)
        depth = {node: _position(node, nodes) for node, _ in layers}
        shapes = self.output_shapes(sorted(depth, key=depth.get))
        out = {}
        for (node, pooling), tap in sorted(layers.items(), key=lambda kv: depth[kv[0][0]]):
            shape = shapes[node]  # [1, C, H, W], [1, T, C] or [1, D]
            spatial = len(shape) == 3 or (len(shape) == 4 and shape[2] * shape[3] > 1)
            name = f"{tap}:{pooling}" if spatial else tap  # a vector needs no pooling: one layer
            out.setdefault(name, Layer(name, tap, node, pooling if spatial else "none", depth[node]))
        return list(out.values())

    def output_shapes(self, nodes):
        """Shape of each node's output for one image, by a dry forward pass."""
        extractor = create_feature_extractor(self.model, return_nodes={n: n for n in nodes})
        with torch.inference_mode():
            out = extractor(torch.zeros(1, 3, self.input_size, self.input_size))
        return {n: tuple(out[n].shape) for n in nodes}

    def extractor(self, layers):
        """A module mapping images [B, 3, H, W] -> {layer name: pooled codes [B, D]}."""
        return Extractor(self.model, layers)


class Extractor(nn.Module):
    """All requested layers in one forward pass; torchvision prunes the graph after the deepest."""

    def __init__(self, model, layers):
        super().__init__()
        self.layers = list(layers)
        nodes = {layer.node: layer.node for layer in self.layers}
        self.body = create_feature_extractor(model, return_nodes=nodes).eval()

    def forward(self, images):
        maps = self.body(images)
        return {layer.name: pool(maps[layer.node], layer.pooling) for layer in self.layers}

    def fold_batchnorm(self):
        """Fold every BatchNorm that follows a convolution into its weights (torch.fx's `fuse`): the
        same function in eval, one memory-bound pass fewer per layer. resnet50 fp32 on the 2-core
        bench machine: about 10% faster; codes within cosine 0.9999998. A convolution whose output
        is itself a requested layer is left alone. The backbone's own model is not changed."""
        from torch.fx.experimental.optimization import fuse

        self.body = fuse(self.body.eval(), inplace=True, no_trace=True).eval()
        return self


def check_pooling(pooling):
    if pooling in ("avg", "max", "avgmax") or re.fullmatch(r"grid[1-9][0-9]?", pooling):
        return pooling
    raise ModelError(f"unknown pooling {pooling!r}; use one of avg, max, avgmax, gridK (K = 1..99, e.g. grid3)")


def pool(x, pooling):
    """Feature map -> [B, D]. 4-D maps [B, C, H, W], token maps [B, T, C], vectors [B, D]."""
    if x.ndim == 2 or pooling == "none":
        return x.flatten(1)
    if x.ndim == 3:  # transformer tokens [B, T, C]: pool over tokens
        x = x.transpose(1, 2).unsqueeze(-1)  # [B, C, T, 1]
    if pooling == "avg":
        return x.mean(dim=(2, 3))
    if pooling == "max":
        return x.amax(dim=(2, 3))
    if pooling == "avgmax":
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
    k = int(pooling[4:])
    return nn.functional.adaptive_avg_pool2d(x, k).flatten(1)  # [B, C * k * k]


def classification_models():
    return sorted(list_models(module=torchvision.models))


def named_taps(model):
    """Friendly tap names -> graph nodes, from the model's own structure (no hand tables)."""
    nodes = get_graph_node_names(model)[1]
    taps = {}
    if isinstance(model, torchvision.models.VGG):
        pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        taps.update({f"conv{k}": f"features.{i}" for k, i in enumerate(pools, start=1)})
        taps.update({"fc6": "classifier.1", "fc7": "classifier.4"})  # after ReLU: the 4096-D codes
    for k in range(1, 5):
        if _in_graph(f"layer{k}", nodes):
            taps[f"layer{k}"] = f"layer{k}"
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and not isinstance(model, torchvision.models.VGG):
        taps.update({f"features.{n}": f"features.{n}" for n, _ in features.named_children() if _in_graph(f"features.{n}", nodes)})
    pooled = [n for n in nodes if n == "avgpool"] or [n for n in nodes if n.startswith("adaptive_avg_pool2d")]
    if pooled:
        taps["avgpool"] = pooled[-1]
    taps["penultimate"] = _penultimate_node(model, nodes)
    return taps


def _position(name, nodes):
    """Forward-order index of a node, or of the last node inside a module."""
    return max(i for i, n in enumerate(nodes) if n == name or n.startswith(name + "."))


def _in_graph(name, nodes):
    """A node, or a module whose last node torchvision takes when asked for its name."""
    return name in nodes or any(n.startswith(name + ".") for n in nodes)


def _penultimate_node(model, nodes):
    """The node feeding the final Linear layer, walking back over dropout/flatten."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name in nodes]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no final Linear layer; name a graph node as the layer instead")
    i = nodes.index(linears[-1]) - 1
    while i > 0 and (nodes[i].startswith("flatten") or _is_skippable(model, nodes[i])):
        i -= 1
    return nodes[i]


def _is_skippable(model, node):
    try:
        return isinstance(model.get_submodule(node), _SKIP_BACK)
    except AttributeError:
        return False


def _canonical_tap(taps, tap, node):
    """Prefer a named tap over an alias or raw node for the same output (penultimate -> fc7)."""
    named = [t for t, n in taps.items() if n == node and t != "penultimate"]
    return named[0] if named else tap


def weights_tag(name, weights):
    """The cache-file tag `load_backbone(name, weights)` would give, without building the model."""
    if weights == "default":
        return get_model_weights(name).DEFAULT.name
    if weights == "none":
        return "random"
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; give WEIGHTS=default, none, or the path of a .pth state dict")
    return f"file-{_sha256(path)[:8]}"


def load_backbone(name, weights="default"):
    """Build `name` with weights "default" (torchvision's pretrained), "none" (random) or a file path."""
    if name not in classification_models():
        import difflib
        close = difflib.get_close_matches(name, classification_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; `pipeline models` lists the torchvision classifiers")
    enums = get_model_weights(name)
    if weights == "default":
        chosen = enums.DEFAULT
        model = _download(name, chosen)
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
        backbone = Backbone(name, model, chosen.transforms(), chosen.name, chosen.name,
                            _sha256(file) if file.exists() else "", chosen.url)
    elif weights == "none":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = get_model(name, weights=None)
        backbone = Backbone(name, model, _classic_transforms(enums), "random", "random", "", "random init (seed 0)")
    else:
        path = Path(weights)
        sha = _sha256(path) if path.is_file() else None
        if sha is None:
            raise WeightsError(f"weights file {path} not found; give WEIGHTS=default, none, or the path of a .pth state dict")
        model = get_model(name, weights=None)
        _load_state_dict(model, path, name)
        backbone = Backbone(name, model, _classic_transforms(enums), "file", f"file-{sha[:8]}", sha, str(path.resolve()))
    backbone.model.eval().requires_grad_(False)
    return backbone


def _classic_transforms(enums):
    """Preprocessing for weights torchvision does not describe: its V1 (resize 256, crop 224) recipe."""
    return getattr(enums, "IMAGENET1K_V1", enums.DEFAULT).transforms()


def _download(name, chosen):
    try:
        return get_model(name, weights=chosen)
    except Exception as e:  # URLError, HTTPError, OSError, hash mismatch: all mean "could not get it"
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
        raise WeightsError(
            f"cannot get the pretrained {name} weights {chosen.name} ({type(e).__name__}: {str(e)[:120]}); "
            f"offline? either download {chosen.url} and put it at {target}, "
            f"or pass WEIGHTS=/path/to/{name}.pth (a state dict), or WEIGHTS=none for random weights"
        ) from None


def _load_state_dict(model, path, name):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a loadable state dict ({type(e).__name__}: {str(e)[:160]}); "
                           "save one with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict; "
                           "save one with torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
        raise WeightsError(f"{path}: does not fit torchvision {name} ({len(missing)} missing, {len(unexpected)} "
                           f"unexpected keys, e.g. {sorted(missing or unexpected)[:2]}"
                           f"{'; shapes differ' if not (missing or unexpected) else ''}); pass the weights "
                           f"of MODEL={name} or the MODEL these weights belong to") from None


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
