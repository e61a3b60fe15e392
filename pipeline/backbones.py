"""Backbones: a frozen torchvision classifier, its weights, its transforms, its taps.

    backbone = load_backbone("mobilenet_v2", "/path/weights.pth")   # or "default" / "none"
    taps = backbone.taps()                    # {"penultimate": "adaptive_avg_pool2d", "features.17": ...}
    layers = backbone.resolve(["penultimate", "features.17:max"])   # [Layer(name, ..., dim)]
    extractor = backbone.extractor(layers)    # one forward pass -> {layer name: codes [B, D]}

A layer is a tap (a named tap or any graph node, see `pipeline taps MODEL`) and a
pooling for spatial maps: `avg` (global average, the default), `max`, `avgmax`
(both, concatenated) or `gridK` (adaptive average to K x K, keeping layout). The
layer's name in the cache carries its pooling, e.g. `layer4:avg`; taps whose output
is already a vector (fc7, avgpool) keep their bare name, and so does `penultimate`:
it is what the final Linear layer reads, never pooled.

The model's graph is traced once per backbone (its node names) and once per set of
tapped nodes (torchvision's feature extractor, whose dry run gives the shapes); both
are kept on the backbone until `extractor()` hands the body over to the loop, so
resolving layers and extracting them trace once per request.
"""
import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .errors import ModelError
from .paths import weights_tag as tag_of
from .preprocess import fast_preprocessing
from .weights import file_sha256, load_weights_file, pretrained, torchvision_weights_of

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
    raw_shape: tuple  # the node's output for one image: (C, H, W), (T, C) or (D,)
    dim: int      # size of the pooled codes

    @property
    def attrs(self):
        """What the cache records about this layer."""
        return {"tap": self.tap, "node": self.node, "pooling": self.pooling, "depth": self.depth,
                "raw_shape": list(self.raw_shape)}


@dataclass
class Backbone:
    """A frozen classifier in eval mode, with what is needed to reproduce its codes."""
    name: str
    model: nn.Module
    transform: object         # PIL image -> uint8 [3, H, W] (preprocess.FastClassification) or normalised float
    weights: str              # "IMAGENET1K_V1", "random" or "file"
    weights_sha256: str       # of the weights file; "" for random weights
    weights_source: str       # URL, path, or "random init (seed 0)"
    model_args: str = ""      # what a weights file's model is built with: "transform_input=True", "num_classes=10"
    _traced: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def input_size(self):
        return int(self.transform.crop_size[0])

    @property
    def weights_tag(self):
        """Part of the cache file name (paths.weights_tag)."""
        return tag_of(self.weights, self.weights_sha256)

    def nodes(self):
        """Every graph node name, in forward order (eval mode); traced once."""
        if "nodes" not in self._traced:
            self._traced["nodes"] = get_graph_node_names(self.model)[1]
        return self._traced["nodes"]

    def taps(self):
        """Named taps of this model -> graph node (see module docstring)."""
        return named_taps(self.model, self.nodes())

    def resolve(self, specs, default_pooling="avg"):
        """["penultimate", "conv5:max", ...] -> [Layer], named as in the cache, in forward order. A tap that is
        already a vector takes no pooling: `default_pooling` passes it by, a pooling asked for is refused."""
        taps, nodes = self.taps(), self.nodes()
        wanted, explicit = {}, {}
        for spec in specs:
            tap, _, given = spec.partition(":")
            pooling = "none" if tap == "penultimate" else check_pooling(given or default_pooling)
            node = taps.get(tap, tap if _in_graph(tap, nodes) else None)
            if node is None:
                raise ModelError(f"{self.name} has no tap {tap!r}; named taps: {', '.join(taps)} "
                                 f"(graph nodes too: `pipeline taps {self.name} --all` lists them all)")
            wanted[(node, pooling)] = _canonical_tap(taps, tap, node)
            if given:
                explicit[(node, pooling)] = spec
        depth = {node: _position(node, nodes) for node, _ in wanted}
        shapes = self.output_shapes(sorted(depth, key=depth.get))
        layers = {}
        for (node, pooling), tap in sorted(wanted.items(), key=lambda kv: depth[kv[0][0]]):
            shape = shapes[node]  # (C, H, W), (T, C) or (D,)
            spatial = pooling != "none" and (len(shape) == 2 or (len(shape) == 3 and shape[1] * shape[2] > 1))
            if not spatial and (node, pooling) in explicit:
                raise ModelError(f"layer {explicit[node, pooling]!r}: {tap} of {self.name} is a vector already (output "
                                 f"{list(shape)}), so it takes no pooling; ask for {tap}, or pool a spatial tap "
                                 f"(`pipeline taps {self.name}` shows the shapes)")
            name = f"{tap}:{pooling}" if spatial else tap  # a vector needs no pooling: one layer
            pooling = pooling if spatial else "none"
            dim = pool(torch.zeros(1, *shape), pooling).shape[1]
            layers.setdefault(name, Layer(name, tap, node, pooling, depth[node], shape, dim))
        return list(layers.values())

    def penultimate_name(self):
        """The cache name of the penultimate layer, without a forward pass."""
        return _canonical_tap(self.taps(), "penultimate", self.taps()["penultimate"])

    def output_shapes(self, nodes):
        """Shape of each node's output for one image (without the batch axis), by one dry run on the
        meta device (shapes only: no arithmetic, the weights untouched), or on the CPU where an
        operation of the model has no meta implementation."""
        key = ("shapes", tuple(sorted(nodes)))
        if key not in self._traced:
            body, image = self._body(nodes), torch.zeros(1, 3, self.input_size, self.input_size)
            with torch.inference_mode():
                try:
                    meta = {name: torch.empty_like(value, device="meta")
                            for name, value in [*body.named_parameters(), *body.named_buffers()]}
                    out = torch.func.functional_call(body, meta, (image.to("meta"),))
                except (NotImplementedError, RuntimeError):
                    out = body(image)
            self._traced[key] = {n: tuple(out[n].shape[1:]) for n in out}
        return self._traced[key]

    def _body(self, nodes):
        """torchvision's feature extractor returning `nodes`, pruned after the deepest; traced once."""
        key = ("body", tuple(sorted(nodes)))
        if key not in self._traced:
            self._traced[key] = create_feature_extractor(self.model, return_nodes={n: n for n in nodes}).eval()
        return self._traced[key]

    def extractor(self, layers):
        """A module mapping images [B, 3, H, W] -> {layer name: pooled codes [B, D]}. It takes over
        the traced body (the loop folds BatchNorm into it in place); a later request traces anew."""
        body = self._body({layer.node for layer in layers})
        del self._traced[("body", tuple(sorted({layer.node for layer in layers})))]
        normalizer = getattr(self.transform, "normalizer", None)
        return Extractor(body, layers, normalizer() if normalizer else None)


class Extractor(nn.Module):
    """All requested layers in one forward pass of `body` (a torchvision feature extractor), after
    `normalize` (preprocess.Normalize: uint8 images to the model's input) when given."""

    def __init__(self, body, layers, normalize=None):
        super().__init__()
        self.layers = list(layers)
        self.body, self.normalize = body, normalize

    def forward(self, images):
        maps = self.body(images if self.normalize is None else self.normalize(images))
        return {layer.name: pool(maps[layer.node], layer.pooling) for layer in self.layers}

    def fold_batchnorm(self):
        """Fold every BatchNorm that follows a convolution into its weights: the same function in eval,
        one memory-bound pass fewer per layer (README: stage-one speed). torch.fx's `fuse` folds the
        pairs of the traced graph, except a convolution whose output is itself a requested layer; the
        pairs inside the blocks the tracer keeps whole (torchvision's Conv2dNormActivation: every conv
        of MobileNets and EfficientNets) are folded here. The backbone's own model is not changed: the
        body owns its parents, and its own copies of those blocks (own_blocks)."""
        from torch.fx.experimental.optimization import fuse
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.own_blocks()
        self.body = fuse(self.body.eval(), inplace=True, no_trace=True).eval()
        for block in self.body.modules():
            if isinstance(block, nn.Sequential):
                for k in range(len(block) - 1):
                    conv, norm = block[k], block[k + 1]
                    if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.track_running_stats:
                        block[k], block[k + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
        return self

    def own_blocks(self):
        """Give the body copies of the modules its graph calls that hold modules of their own (blocks the
        tracer keeps whole), so that changing them leaves the backbone's model as it is. The body's other
        modules are the model's own leaves, in parents of the body's own (torch.fx makes those)."""
        for target in {node.target for node in self.body.graph.nodes if node.op == "call_module"}:
            block = self.body.get_submodule(target)
            if next(block.children(), None):
                parent, _, name = target.rpartition(".")
                setattr(self.body.get_submodule(parent), name, copy.deepcopy(block))
        return self


def check_pooling(pooling):
    """`pooling` if it is one of POOLINGS, else a ModelError listing them."""
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


def named_taps(model, nodes):
    """Friendly tap names -> graph nodes (`nodes`: the eval graph's), from the model's own structure."""
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


def load_backbone(name, weights="default", preprocessing="fast"):
    """Build `name` with weights "default" (torchvision's pretrained), "none" (random) or a file path;
    `preprocessing` "fast" (preprocess.FastClassification where it applies) or "reference" (torchvision's)."""
    if name not in classification_models():
        import difflib
        close = difflib.get_close_matches(name, classification_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; `pipeline models` lists the torchvision classifiers")
    enums = get_model_weights(name)
    if weights == "default":
        chosen = enums.DEFAULT
        model, sha = pretrained(name, chosen)
        backbone = Backbone(name, model, chosen.transforms(), chosen.name, sha, chosen.url)
    elif weights == "none":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = get_model(name, weights=None)
        backbone = Backbone(name, model, _classic_transforms(enums, model), "random", "", "random init (seed 0)")
    else:
        sha = file_sha256(weights)
        model, args = load_weights_file(name, Path(weights))
        known = torchvision_weights_of(name, sha)  # a torchvision download: its own recipe, as "default" has
        transform = known.transforms() if known else _classic_transforms(enums, model)
        backbone = Backbone(name, model, transform, "file", sha, str(Path(weights).resolve()),
                            ", ".join(f"{key}={value}" for key, value in args.items()))
    backbone.model.eval().requires_grad_(False)
    if preprocessing == "fast":
        backbone = replace(backbone, transform=fast_preprocessing(backbone.transform))
    return backbone


def _classic_transforms(enums, model):
    """Preprocessing for weights torchvision does not describe: its V1 (resize 256, crop 224) recipe, or
    for a ViT that of torchvision's first weights for the model's input size."""
    size, classic = getattr(model, "image_size", None), getattr(enums, "IMAGENET1K_V1", enums.DEFAULT)
    if size is None or classic.meta["min_size"][0] == size:
        return classic.transforms()
    sized = [weights for weights in enums if weights.meta["min_size"][0] == size]
    if not sized:
        sizes = sorted({weights.meta["min_size"][0] for weights in enums})
        raise ModelError(f"torchvision has no preprocessing for {type(model).__name__} at {size} px (its weights "
                         f"take {', '.join(map(str, sizes))}); pass weights for one of those sizes")
    return sized[0].transforms()
