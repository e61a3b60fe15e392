"""Weights for torchvision's classifiers: its pretrained ones (downloaded once), or a state-dict file.

    model, sha256 = pretrained("vgg16", VGG16_Weights.DEFAULT)   # downloaded once; WeightsError offline
    model, args = load_weights_file("googlenet", Path("g.pth"))  # weights_only, strict keys; built as for
                                                                 # its pretrained weights: transform_input
    weights_tag("vgg16", "default")                              # the cache-file tag, no model built
    torchvision_weights_of("resnet50", sha256)                   # ResNet50_Weights.IMAGENET1K_V2 for its file

A file, torchvision's downloads included, is read with `torch.load(weights_only=True)`:
nothing is unpickled. Its sha256 goes into the cache, so that other weights make another
cache.
"""
import functools
import hashlib
import math
import re
import sys
from pathlib import Path

import torch
from torch.hub import HASH_REGEX
from torchvision.models import get_model, get_model_weights

from .errors import WeightsError
from .paths import weights_tag as tag_of

__all__ = ["file_sha256", "load_weights_file", "pretrained", "torchvision_weights_of",
           "weights_tag"]


def weights_tag(name, weights):
    """The cache-file tag `load_backbone(name, weights)` would give, without building the model."""
    if weights == "default":
        return tag_of(get_model_weights(name).DEFAULT.name)
    if weights == "none":
        return tag_of("random")
    return tag_of("file", file_sha256(weights))


def file_sha256(weights):
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; give WEIGHTS=default, none, or the path of a .pth state dict")
    return _sha256(path)


def pretrained(name, chosen):
    """torchvision's `name` with its pretrained weights `chosen` -> (model, the file's sha256). The file
    is downloaded into torch's cache once, its sha256 checked against the digits its name carries, and
    loaded as a weights file is (load_weights_file: weights_only, where torchvision's own builders
    unpickle it, and no random initialisation to overwrite)."""
    file = _downloaded(chosen)
    if not file.exists():
        _download(name, chosen, file)
    sha, digits = _sha256(file), HASH_REGEX.search(file.name)
    if digits and not sha.startswith(digits.group(1)):
        raise WeightsError(f"{file}: its sha256 starts {sha[:len(digits.group(1))]}, not {digits.group(1)} as its "
                           "name says: a damaged or altered download; delete it and run again to download it anew")
    return load_weights_file(name, file)[0], sha


def _download(name, chosen, file):
    """`chosen`'s file from torchvision's server to `file`, as torch.hub does (checked against the sha256
    digits in its name); any failure -> WeightsError naming both remedies."""
    digits = HASH_REGEX.search(file.name)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        print(f'Downloading: "{chosen.url}" to {file}', file=sys.stderr)
        torch.hub.download_url_to_file(chosen.url, str(file), digits.group(1) if digits else None, progress=True)
    except Exception as e:  # URLError, HTTPError, OSError, hash mismatch: all mean "could not get it"
        raise WeightsError(
            f"cannot get the pretrained {name} weights {chosen.name} ({type(e).__name__}: {str(e)[:120]}); "
            f"offline? either download {chosen.url} and put it at {file}, "
            f"or pass WEIGHTS=/path/to/{name}.pth (a state dict), or WEIGHTS=none for random weights"
        ) from None


def torchvision_weights_of(name, sha256):
    """torchvision's own weights of `name` whose download has this sha256 (its file names carry the
    sha256's first hex digits: resnet50-11ad3fa6.pth), or None."""
    for weights in get_model_weights(name):
        digits = HASH_REGEX.search(Path(weights.url).name)
        if digits and len(digits.group(1)) >= 8 and sha256.startswith(digits.group(1)):
            return weights
    return None


def _downloaded(chosen):
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name


# What torchvision's builders set for their own pretrained weights that changes the codes and that a
# state dict does not record: GoogLeNet's and Inception v3's weights, ported from TensorFlow, take
# inputs in [-1, 1], which `transform_input` makes of ImageNet-normalised ones.
PRETRAINED_ARGS = {"googlenet": {"transform_input": True}, "inception_v3": {"transform_input": True}}
_AUXILIARY = {"googlenet": "aux1.", "inception_v3": "AuxLogits."}  # training-only heads: built if a file has them
IMAGENET_CLASSES = 1000  # what get_model(name) classifies


def load_weights_file(name, path):
    """torchvision's `name` holding the state dict at `path`, built as torchvision builds it for its
    pretrained weights (PRETRAINED_ARGS), with the file's own input size (ViTs) and number of classes
    where they differ -> (model, the arguments that differ from `get_model(name)`'s).

    The model is built on the meta device and given uninitialised memory for the file to fill
    (`to_empty`): a random initialisation, only to be overwritten, is most of a large model's build
    (README: models, layers and pooling)."""
    state = _renamed_keys(_read_state_dict(path))
    args = dict(PRETRAINED_ARGS.get(name, {}))
    build = dict(args, **({"aux_logits": any(key.startswith(_AUXILIARY[name]) for key in state),
                           "init_weights": False} if name in _AUXILIARY else {}))
    model = _build(name, build)
    for fit in (_own_image_size, _own_classes):  # what a fine-tuned file may change: rebuilt to fit it
        found = fit(model, state)
        if found:
            args.update(found)
            build.update(found)
            model = _build(name, build)
    if any(p.is_meta for p in model.parameters()):
        model = model.to_empty(device="cpu")
    uncounted = {key: torch.tensor(0) for key in model.state_dict() if key.endswith("num_batches_tracked")}
    _load_state_dict(model, {**uncounted, **state}, path, name)  # files older than BatchNorm's count lack it
    return model, args


# DenseNet files of torchvision's (its downloads among them) name two layers of each dense layer
# `norm.1`, `conv.2`, ...: names a module may no longer have. Its builder renames them; so does this.
_DENSE_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _renamed_keys(state):
    renamed = {}
    for key, value in state.items():
        found = _DENSE_LAYER_KEY.match(key)
        renamed[found[1] + found[2] if found else key] = value
    return renamed


def _build(name, build):
    """`name` on the meta device, or built in full where the meta device cannot build it or it has
    state that no file holds (non-persistent buffers)."""
    try:
        with torch.device("meta"):
            model = get_model(name, weights=None, **build)
        if not ({key for key, _ in model.named_buffers()} - model.state_dict().keys()):
            return model
    except Exception:  # e.g. RegNet, whose builder computes on its tensors
        pass
    return get_model(name, weights=None, **build)


def _own_image_size(model, state):
    """A ViT file's input size where it is not the model's: one position embedding per patch, and one
    for the class token -> {"image_size": size} or {}."""
    embedding = state.get("encoder.pos_embedding")
    if not hasattr(model, "patch_size") or not hasattr(embedding, "shape") or len(embedding.shape) != 3:
        return {}
    size = math.isqrt(embedding.shape[1] - 1) * model.patch_size
    return {"image_size": size} if size != model.image_size else {}


def _own_classes(model, state):
    """The number of classes of a file that differs from the ImageNet model in that alone (the first
    dimension of its classifiers) -> {"num_classes": n} or {}."""
    own = model.state_dict()
    differ = _misshapen(own, state)
    classifiers = all(hasattr(state[key], "shape") and own[key].dim() >= 1 and own[key].shape[0] == IMAGENET_CLASSES
                      and tuple(state[key].shape[1:]) == tuple(own[key].shape[1:])
                      and len(state[key].shape) == own[key].dim() for key in differ)
    if not (differ and classifiers):
        return {}
    classes = {state[key].shape[0] for key in differ}
    return {"num_classes": classes.pop()} if len(classes) == 1 else {}


def _misshapen(own, state):
    """The keys of `own` whose value in the file has another shape (or none: not a tensor)."""
    return [key for key in own if key in state and getattr(state[key], "shape", None) != own[key].shape]


def _read_state_dict(path):
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
    return state


def _load_state_dict(model, state, path, name):
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        own = model.state_dict()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or unexpected:
            misfit = (f"{len(missing)} missing, {len(unexpected)} unexpected keys, "
                      f"e.g. {sorted(missing or unexpected)[:2]}")
        else:
            key = next(iter(_misshapen(own, state)), None)
            misfit = (f"{key} is {list(getattr(state[key], 'shape', []))} in the file, {list(own[key].shape)} "
                      "in the model") if key else str(error).strip().splitlines()[-1][:160]
        raise WeightsError(f"{path}: does not fit torchvision {name} ({misfit}); pass the weights "
                           f"of MODEL={name} or the MODEL these weights belong to") from None


def _sha256(path):
    """A file's sha256, read once per process while its size and mtime stay: the duplicates rule, the
    backbone and the cache key all ask for it, and a large model's file takes a second to read."""
    stat = Path(path).stat()
    return _file_sha256(Path(path).resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
