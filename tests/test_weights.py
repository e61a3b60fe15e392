"""Weights: torchvision's pretrained ones, state-dict files (built without a wasted initialisation), errors."""
import hashlib
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from torchvision.models import get_model

from pipeline.backbones import load_backbone
from pipeline.errors import WeightsError
from pipeline.weights import load_weights_file, pretrained, weights_tag


def test_weights_file_loaded_with_sha(tmp_path):
    model = get_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    backbone = load_backbone("resnet18", path)
    assert torch.equal(backbone.model.fc.weight, model.fc.weight)
    assert backbone.weights == "file" and len(backbone.weights_sha256) == 64
    assert backbone.weights_tag == f"file-{backbone.weights_sha256[:8]}" == weights_tag("resnet18", path)


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("resnet18", tmp_path / "missing.pth")
    wrong = tmp_path / "mnv2.pth"
    torch.save(get_model("mobilenet_v2").state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"does not fit torchvision resnet18 .*missing.*MODEL="):
        load_backbone("resnet18", wrong)
    grey = tmp_path / "r18-grey.pth"
    torch.save({**get_model("resnet18").state_dict(), "conv1.weight": torch.zeros(64, 1, 7, 7)}, grey)
    with pytest.raises(WeightsError, match=re.escape("(conv1.weight is [64, 1, 7, 7] in the file, [64, 3, 7, 7] "
                                                     "in the model)")):
        load_backbone("resnet18", grey)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a loadable state dict"):
        load_backbone("resnet18", garbage)


def test_pickled_object_is_refused(tmp_path):
    """weights_only=True: a file that needs arbitrary unpickling is never executed."""
    evil = tmp_path / "evil.pth"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, evil)
    with pytest.raises(WeightsError, match="not a loadable state dict"):
        load_backbone("resnet18", evil)


def test_default_weights_offline_names_both_remedies(monkeypatch, tmp_path):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    where = re.escape(str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"))  # where to put the file
    with pytest.raises(WeightsError, match=rf"^[^\n]*{where}.*WEIGHTS=/path/to/resnet18\.pth[^\n]*$"):
        load_backbone("resnet18", "default")


def test_pretrained_weights_are_downloaded_once_and_never_unpickled(monkeypatch, tmp_path):
    """torchvision's builders load their downloads with torch.hub's weights_only=False; here the file is
    loaded as any weights file is, and what the server sent is checked against its name's digits."""
    model = get_model("resnet18")
    served = tmp_path / "served.pth"
    torch.save(model.state_dict(), served)
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    chosen = SimpleNamespace(name="IMAGENET1K_V1", url=f"https://download.pytorch.org/models/resnet18-{sha[:8]}.pth")
    downloads, loads, load = [], [], torch.load

    def download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        shutil.copy(served, dst)

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for _ in range(2):
        loaded, digest = pretrained("resnet18", chosen)
        assert digest == sha and all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert downloads == [(chosen.url, sha[:8])] and loads == [True, True]


def test_a_damaged_download_is_refused_with_the_remedy(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    damaged = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    damaged.parent.mkdir(parents=True)
    torch.save(get_model("resnet18").state_dict(), damaged)  # the right keys, not the bytes its name promises
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(damaged))}: its sha256 starts [0-9a-f]{{8}}, not "
                                           r"f37072fd as its name says: .*delete it and run again"):
        load_backbone("resnet18", "default")


def test_a_weights_file_is_loaded_without_initialising_the_weights_it_overwrites(tmp_path, monkeypatch):
    model = get_model("resnet18")
    model.bn1.running_mean.uniform_()  # buffers too: none may stay uninitialised
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)

    def initialise(tensor, *args, **kwargs):  # on the meta device it costs nothing
        assert tensor.is_meta, "a random initialisation ran on real memory"
        return tensor

    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", initialise)
    loaded, args = load_weights_file("resnet18", path)
    assert args == {} and all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_a_model_the_meta_device_cannot_build_and_half_precision_files_load_as_before(tmp_path):
    model = get_model("regnet_x_400mf")  # its builder computes on tensors: built in full
    path = tmp_path / "regnet.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    loaded, _ = load_weights_file("regnet_x_400mf", path)
    assert loaded.fc.weight.dtype == torch.float32  # copied into the model's own dtype, as load_state_dict does
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight.half().float(), rtol=0, atol=0)
    resnet = get_model("resnet18")
    path = tmp_path / "r18-half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in resnet.state_dict().items()}, path)
    assert load_weights_file("resnet18", path)[0].fc.weight.dtype == torch.float32


def test_a_googlenet_file_is_built_as_torchvision_builds_its_pretrained_weights(tmp_path):
    """GoogLeNet's pretrained weights take inputs in [-1, 1] (transform_input), which no state dict records;
    a file with or without the training-only auxiliary heads loads."""
    as_pretrained = get_model("googlenet", weights=None, transform_input=True, aux_logits=True,
                              init_weights=False).eval()
    with_aux, without_aux = tmp_path / "torchvision-download.pth", tmp_path / "saved-pretrained-model.pth"
    torch.save(as_pretrained.state_dict(), with_aux)
    torch.save({k: v for k, v in as_pretrained.state_dict().items() if not k.startswith(("aux1.", "aux2."))},
               without_aux)
    image = torch.randn(2, 3, 96, 96)
    for path, aux in ((with_aux, True), (without_aux, False)):
        model, args = load_weights_file("googlenet", path)
        assert args == {"transform_input": True} and model.transform_input and model.aux_logits == aux
        torch.testing.assert_close(model.eval()(image), as_pretrained(image), rtol=0, atol=0)


def test_what_a_file_model_is_built_with_is_in_the_cache_key_only_where_set(tmp_path):
    """Caches of googlenet files made before they were built as pretrained are rebuilt; no other cache is."""
    from types import SimpleNamespace
    from pipeline.plan import _differences, cache_key
    table = SimpleNamespace(name="t", layout="imagefolder", fingerprint="f", split_source="folders",
                            drop_duplicates=False)
    torch.save(get_model("googlenet", weights=None, init_weights=False).state_dict(), tmp_path / "g.pth")
    googlenet = cache_key(table, load_backbone("googlenet", str(tmp_path / "g.pth")), "fp32")
    resnet = cache_key(table, load_backbone("resnet18", "none"), "fp32")
    assert googlenet["model_args"] == "transform_input=True" and "model_args" not in resnet
    made_before = {k: v for k, v in googlenet.items() if k != "model_args"}
    assert _differences(made_before, googlenet) == ["model_args"] and _differences(resnet, resnet) == []


def test_a_file_of_torchvision_weights_gets_their_own_preprocessing(tmp_path, monkeypatch):
    """torchvision's downloads are known by their sha256, whose first digits their names carry: such a file
    gets its weights' own recipe (resnet50's IMAGENET1K_V2 resizes to 232), as WEIGHTS=default would;
    any other file the classic one (resize 256)."""
    from dataclasses import replace
    from torchvision.models import ResNet18_Weights, ResNet50_Weights
    from pipeline.weights import torchvision_weights_of
    assert torchvision_weights_of("resnet18", "f37072fd" + "0" * 56) == ResNet18_Weights.IMAGENET1K_V1
    assert torchvision_weights_of("resnet18", "0" * 64) is None
    path = tmp_path / "r18.pth"
    torch.save(get_model("resnet18").state_dict(), path)
    assert load_backbone("resnet18", path, preprocessing="reference").transform.resize_size == [256]
    sha = load_backbone("resnet18", path).weights_sha256
    download = replace(ResNet50_Weights.IMAGENET1K_V2.value, url=f"https://example.org/resnet18-{sha[:8]}.pth")
    monkeypatch.setattr("pipeline.weights.get_model_weights", lambda name: [download])
    backbone = load_backbone("resnet18", path, preprocessing="reference")
    assert backbone.transform.resize_size == [232] and backbone.weights == "file"


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])  # a linear classifier, a convolutional one
def test_a_fine_tuned_model_with_its_own_number_of_classes_loads(tmp_path, name):
    fine_tuned = get_model(name, num_classes=10)
    path = tmp_path / f"{name}-10.pth"
    torch.save(fine_tuned.state_dict(), path)
    model, args = load_weights_file(name, path)
    assert args == {"num_classes": 10}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fine_tuned.state_dict().items())
    assert load_backbone(name, path).model_args == "num_classes=10"


def test_a_fine_tuned_models_codes_below_its_classifier_are_the_imagenet_architectures(tmp_path):
    torch.save(get_model("resnet18", num_classes=10).state_dict(), tmp_path / "r18-10.pth")
    backbone = load_backbone("resnet18", tmp_path / "r18-10.pth")
    [layer] = backbone.resolve(["penultimate"])
    image = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert layer.dim == 512 and backbone.extractor([layer])(image)[layer.name].shape == (2, 512)


def test_a_vit_file_of_another_input_size_is_built_at_it_with_torchvisions_recipe_for_it(tmp_path):
    """vit_b_16 at 384 px, the size of torchvision's SWAG end-to-end weights: its position embeddings say so."""
    path = tmp_path / "vit-384.pth"
    torch.save(get_model("vit_b_16", image_size=384).state_dict(), path)
    backbone = load_backbone("vit_b_16", path)
    assert backbone.model.image_size == 384 and backbone.model_args == "image_size=384"
    assert backbone.transform.crop_size == [384] and backbone.input_size == 384
    [layer] = backbone.resolve(["penultimate"])
    assert backbone.extractor([layer])(torch.randn(1, 3, 384, 384))[layer.name].shape == (1, 768)


def test_a_vit_is_preprocessed_for_its_input_size_or_refused_with_the_sizes_there_are():
    from types import SimpleNamespace
    from torchvision.models import ViT_B_32_Weights, ViT_H_14_Weights
    from pipeline.backbones import _classic_transforms
    from pipeline.errors import ModelError
    assert _classic_transforms(ViT_H_14_Weights, SimpleNamespace(image_size=224)).crop_size == [224]  # not 518
    with pytest.raises(ModelError, match="no preprocessing for SimpleNamespace at 384 px .*take 224"):
        _classic_transforms(ViT_B_32_Weights, SimpleNamespace(image_size=384))


def test_a_weights_file_is_hashed_once_while_it_stays_the_same(tmp_path, monkeypatch):
    import hashlib
    from pipeline import weights
    path = tmp_path / "w.pth"
    path.write_bytes(b"first")
    reads = []
    monkeypatch.setattr(weights, "open", lambda *a, **k: reads.append(a[0]) or open(*a, **k), raising=False)
    assert weights.file_sha256(path) == weights.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert len(reads) == 1  # the duplicates rule, the backbone and the cache key: one read
    path.write_bytes(b"second, longer")  # rewritten: hashed again
    assert weights.file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest() and len(reads) == 2


def test_a_densenet_file_with_torchvision_s_old_key_names_loads(tmp_path):
    """torchvision's DenseNet downloads name layers `norm.1`, `conv.2`, ... (its builder renames them),
    and, older than BatchNorm's batch counts, have none."""
    model = get_model("densenet121")
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
           for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old, path)
    loaded, args = load_weights_file("densenet121", path)
    assert args == {} and all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
