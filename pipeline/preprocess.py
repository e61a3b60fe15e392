"""Preprocessing: torchvision's ImageClassification recipe, cheaper per image, the same pixels.

    fast = fast_preprocessing(weights.transforms())   # FastClassification, or the transform as given
    pixels = fast(image)                               # uint8 [3, 224, 224]
    x = fast.normalizer()(batch)                       # float [B, 3, 224, 224]: in the forward pass

ImageClassification resizes each picture's shorter side to 256 (bilinear), crops the
centre 224, converts to float and normalises it, per image. Here the crop is mapped
back onto the decoded picture and resized once, straight to 224 (PIL's
`resize(box=...)`: the same resampling grid, so the same pixels within PIL's rounding),
the picture stays uint8 (a quarter of the bytes to collate and copy), and the
normalisation runs once per batch inside the forward pass (`Normalize`, on the device).
`make bench` measures each step and the codes' cosine to the reference recipe.
"""
import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

__all__ = ["FastClassification", "Normalize", "fast_preprocessing"]


def fast_preprocessing(transform):
    """The fast equivalent of `transform` when it is torchvision's bilinear ImageClassification, else `transform`."""
    if (isinstance(transform, ImageClassification) and transform.interpolation == InterpolationMode.BILINEAR
            and len(transform.resize_size) == 1 and len(transform.crop_size) == 1):
        return FastClassification(transform)
    return transform


class FastClassification:
    """PIL image -> uint8 tensor [3, crop, crop]: `reference`'s resize and centre crop in one resize."""

    def __init__(self, reference):
        self.reference = reference
        self.resize_size, self.crop_size = list(reference.resize_size), list(reference.crop_size)
        self.mean, self.std = list(reference.mean), list(reference.std)

    def __call__(self, image):
        crop = self.crop_size[0]
        picture = image.resize((crop, crop), Image.BILINEAR, box=self.crop_box(*image.size))
        return torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W]

    def crop_box(self, width, height):
        """The centre crop of the resized picture, in the coordinates of the picture as decoded (the sizes
        and offsets torchvision computes: the longer side truncated, the offsets rounded)."""
        short, crop = self.resize_size[0], self.crop_size[0]
        if width <= height:
            size = (short, int(short * height / width))
        else:
            size = (int(short * width / height), short)
        left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
        sx, sy = width / size[0], height / size[1]
        return (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)

    def normalizer(self):
        return Normalize(self.mean, self.std)

    def __repr__(self):
        return (f"FastClassification(one resize of the centre crop to {self.crop_size}, as "
                f"resize {self.resize_size} + crop {self.crop_size}, bilinear; uint8; per-batch "
                f"normalisation mean={self.mean} std={self.std})")


class Normalize(nn.Module):
    """uint8 images [B, 3, H, W] -> float, normalised as torchvision's recipe: (x / 255 - mean) / std.
    Float images pass unchanged (a transform that normalises them itself)."""

    def __init__(self, mean, std):
        super().__init__()
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (255.0 * std))

    def forward(self, images):
        if images.dtype != torch.uint8:
            return images
        return images.float().sub_(self.shift).mul_(self.scale)  # in place: one new tensor, not three
