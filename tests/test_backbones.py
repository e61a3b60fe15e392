"""Backbones: taps from the model's structure, dims from a dry pass, pooling."""
import pytest
import torch

from pipeline import backbones
from pipeline.backbones import load_backbone, pool
from pipeline.errors import ModelError


@pytest.fixture(scope="module")
def vgg16():
    return load_backbone("vgg16", "none")


def test_vgg16_taps_and_dims(vgg16):
    taps = vgg16.taps()
    assert [t for t in taps if t.startswith("conv")] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert taps["penultimate"] == taps["fc7"] == "classifier.4"
    layers = vgg16.resolve(["penultimate", "conv5", "fc6", "conv3:grid3", "conv1:avgmax"])
    raw = {layer.name: layer.raw_shape for layer in layers}
    assert [layer.name for layer in layers] == ["conv1:avgmax", "conv3:grid3", "conv5:avg", "fc6", "fc7"]
    assert raw["fc7"] == (4096,) and raw["conv5:avg"] == (512, 7, 7)
    codes = vgg16.extractor(layers)(torch.rand(2, 3, 224, 224))
    dims = {"conv1:avgmax": 128, "conv3:grid3": 256 * 9, "conv5:avg": 512, "fc6": 4096, "fc7": 4096}
    assert {k: v.shape[1] for k, v in codes.items()} == dims == {layer.name: layer.dim for layer in layers}
    assert vgg16.penultimate_name() == "fc7"
    assert (codes["fc7"] >= 0).all()  # after ReLU: the classic CNN codes


@pytest.mark.parametrize("name, penultimate, dim, early", [
    ("resnet50", "avgpool", 2048, "layer1"),
    ("mobilenet_v2", "avgpool", 1280, "features.3"),
    ("efficientnet_b0", "avgpool", 1280, "features.2"),
])
def test_penultimate_is_the_input_of_the_classifier(name, penultimate, dim, early):
    backbone = load_backbone(name, "none")
    [pen, first] = backbone.resolve(["penultimate", early])[::-1]
    assert pen.name == penultimate and pen.pooling == "none"
    assert first.name == f"{early}:avg"
    x = torch.rand(2, 3, 224, 224)
    codes = backbone.extractor([pen])(x)[pen.name]
    # the penultimate codes, fed to the model's own last Linear, give the model's logits
    last_linear = [m for m in backbone.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert codes.shape == (2, dim)
    assert torch.allclose(last_linear(codes), backbone.model(x), atol=1e-4)


def test_raw_graph_node_is_a_tap():
    backbone = load_backbone("resnet18", "none")
    [layer] = backbone.resolve(["layer3.1.relu_1:max"])
    assert layer.node == "layer3.1.relu_1" and layer.name == "layer3.1.relu_1:max"


def test_unknown_tap_names_choices_and_command(vgg16):
    with pytest.raises(ModelError, match=r"no tap 'conv9'.*conv1.*`pipeline taps vgg16 --all` lists them all"):
        vgg16.resolve(["conv9"])


def test_a_pooling_of_a_vector_tap_is_refused_when_asked_for_and_passed_by_as_the_default(vgg16):
    for spec in ("fc7:max", "penultimate:avg"):
        with pytest.raises(ModelError, match=rf"layer '{spec}': fc7 of vgg16 is a vector already \(output \[4096\]\), "
                                             "so it takes no pooling; ask for fc7"):
            vgg16.resolve(["conv5:max", spec])
    assert [layer.name for layer in vgg16.resolve(["conv5:max", "fc7"])] == ["conv5:max", "fc7"]
    assert [layer.name for layer in vgg16.resolve(["conv5", "fc7"], default_pooling="max")] == ["conv5:max", "fc7"]


def test_unknown_pooling_and_model():
    with pytest.raises(ModelError, match="gridK"):
        backbones.check_pooling("median")
    with pytest.raises(ModelError, match=r"did you mean resnet50.*pipeline models"):
        load_backbone("resnet5O", "none")


def test_pooling_shapes_and_values():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(pool(x, "avg"), x.mean(dim=(2, 3)))
    assert torch.equal(pool(x, "max"), x[:, :, 3, 3])
    assert pool(x, "avgmax").shape == (2, 6)
    assert torch.equal(pool(x, "grid2")[:, :4], torch.nn.functional.avg_pool2d(x, 2)[:, 0].flatten(1))
    assert pool(torch.rand(2, 5, 7), "avg").shape == (2, 7)  # tokens [B, T, C]


def test_random_weights_are_seeded_and_marked():
    a, b = load_backbone("resnet18", "none"), load_backbone("resnet18", "none")
    assert a.weights == "random" and a.weights_tag == "random" and a.weights_sha256 == ""
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)


def test_shapes_from_the_meta_dry_run_match_a_real_one(monkeypatch):
    specs = ["layer2:grid2", "layer4.1.relu_1:max", "penultimate"]
    meta = load_backbone("resnet18", "none")
    weights = [p.detach().clone() for p in meta.model.parameters()]
    layers = meta.resolve(specs)
    assert all(torch.equal(a, b) for a, b in zip(weights, meta.model.parameters()))  # restored, on the CPU
    assert all(p.device.type == "cpu" for p in meta.model.parameters())

    def no_meta_kernel(*args, **kwargs):
        raise NotImplementedError("an operation without a meta implementation")
    monkeypatch.setattr(torch.func, "functional_call", no_meta_kernel)
    real = load_backbone("resnet18", "none").resolve(specs)  # falls back to a dry run on the CPU
    assert layers == real
    assert [(layer.raw_shape, layer.dim) for layer in layers] == [((128, 28, 28), 512), ((512, 7, 7), 512),
                                                                 ((512, 1, 1), 512)]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_batchnorm_inside_the_blocks_the_tracer_keeps_whole_is_folded_too(name):
    """torchvision's Conv2dNormActivation is one node of the traced graph: its pairs are folded inside it."""
    backbone = load_backbone(name, "none")
    torch.manual_seed(1)
    for module in backbone.model.modules():  # statistics far from the identity, as trained ones are
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    [layer] = backbone.resolve(["penultimate"])
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        before = backbone.extractor([layer])(x)[layer.name]
        model_before = backbone.model(x)
        folded = backbone.extractor([layer]).fold_batchnorm()
        after = folded(x)[layer.name]
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.body.modules())
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
        assert torch.equal(backbone.model(x), model_before)  # the model keeps its blocks, unfolded


def test_folding_batchnorm_keeps_the_codes_and_the_model():
    backbone = load_backbone("resnet18", "none")
    torch.manual_seed(1)
    for module in backbone.model.modules():  # BatchNorm statistics far from the identity, as trained ones are
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    layers = backbone.resolve(["layer2:avg", "layer3.0.bn1:max", "layer3.1.conv2:avg", "penultimate"])
    x = torch.randn(3, 3, 64, 64)
    before = {name: v.detach().clone() for name, v in backbone.extractor(layers)(x).items()}
    folded = backbone.extractor(layers).fold_batchnorm()
    kinds = {type(m).__name__ for m in folded.body.modules()}
    assert "BatchNorm2d" in kinds  # the one after the tapped layer3.1.conv2 stays
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.body.modules()) == 1
    with torch.inference_mode():
        after = folded(x)
    for name, value in before.items():
        scale = value.abs().max()
        assert torch.allclose(after[name], value, rtol=1e-4, atol=1e-4 * scale), name
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.model.modules()) == 20  # untouched
    again = backbone.extractor(layers)(x)
    assert all(torch.equal(again[name], before[name]) for name in before)
