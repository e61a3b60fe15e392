"""The tutorial loop `make bench` compares the pipeline with: what a transfer-learning tutorial runs.

    fresh_baseline(root, "resnet50", "none", torch.device("cpu"))   # {"images", "seconds", "images_per_s", "dim"}
"""
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from pipeline.backbones import load_backbone

from measure import in_fresh_process


def baseline(root, model, weights, device, batch_size=4, workers=4):
    """The tutorial loop, faithfully -> its rate. ImageFolder per split, DataLoader(batch 4, 4 workers),
    fp32, torch.no_grad(), Resize(256)/CenterCrop(224)/ToTensor/Normalize, a freshly loaded model with
    its last Linear replaced by Identity (penultimate features), each batch appended to a list as numpy.
    It must run before anything else in its process (prepare_model changes how memory is allocated):
    fresh_baseline runs it in a new one."""
    from torchvision import datasets, transforms

    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = ConcatDataset([datasets.ImageFolder(root / split, preprocess)
                          for split in ("train", "val", "test") if (root / split).is_dir()])
    model = load_backbone(model, weights).model
    last = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    parent, _, child = last.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    model = model.to(device).eval()
    features = []
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*worker processes in total")  # 4 on 2 cores, as tutorials do
        for inputs, _ in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers):
            features.append(model(inputs.to(device)).cpu().numpy())
    seconds = time.perf_counter() - t0
    return {"images": len(data), "seconds": seconds, "images_per_s": len(data) / seconds,
            "dim": int(np.concatenate(features).shape[1])}


def fresh_baseline(root, model, weights, device):
    """baseline() as the first thing in a new process -> its result."""
    return in_fresh_process("tutorial_loop", "child_baseline", root=str(root), model=model, weights=weights,
                            device=str(device))


def child_baseline(root, model, weights, device):
    return baseline(Path(root), model, weights, torch.device(device))
