"""JPEG decoding where the model runs (nvJPEG on a GPU, through TorchCodec or torchvision): `--decode device`.

    batches = encoded_batches(source, transform, rows, batch_size, num_workers)
    for batch in decoded_on(device, batches, transform):   # images: uint8 [B, 3, crop, crop] on `device`
        ...

On a GPU, decoding photos on the CPU becomes the whole cost of stage one. Here the
DataLoader's workers only read each file once (its bytes, its sha256) and look at its
header (PIL, no pixel decoded): a plain JPEG (RGB or greyscale, no EXIF turn, whole,
within the decompression-bomb limit) travels as its bytes, a batch's JPEGs end to end
in one tensor (Encoded); anything else (PNG, CMYK, an MPO, a file that is not an
image) is decoded in the worker exactly as on the CPU path. Where the model runs, a
batch's JPEGs are decoded in as few calls as DECODE_PIXELS allows and resized and
centre-cropped as torchvision's recipe does, on tensors, with antialiasing; on a GPU
by a thread of its own on a CUDA stream of its own, a batch or two ahead of the model,
so that decoding overlaps the forward pass. A JPEG the decoder refuses is decoded by
PIL instead, or skipped with PIL's reason. The decoder is
TorchCodec's, torchvision's successor for image decoding (an optional dependency, `pip
install -e '.[gpu]'`), or, where TorchCodec is missing or cannot decode on the device,
torchvision's own (deprecated since torchvision 0.29).
"""
import contextlib
import hashlib
import io
import threading
from dataclasses import dataclass
from queue import Empty, Full, Queue

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from .errors import ImageDecodeError, PipelineError
from .images import check_pixel_count, decode_image, one_line, read_image_bytes
from .sources import Batch

__all__ = ["encoded_batches", "decoded_on", "check_device_decoding", "jpeg_decoder", "plain_jpeg"]

_ORIENTATION = 0x0112  # the EXIF tag of a photo's turn
_EOI = b"\xff\xd9"     # the marker a whole JPEG ends with
DECODE_PIXELS = 1 << 27  # pixels decoded per call at most (400 MB of RGB): whole batches of photos, not of 12 MP ones
DECODE_AHEAD = 2        # batches decoded ahead of the model on a GPU


def check_device_decoding(transform, device=torch.device("cpu")):
    """Raise PipelineError unless `--decode device` can run: a JPEG decoder that decodes on `device`
    (jpeg_decoder) and the transform torchvision's resize-and-crop recipe (preprocess.FastClassification)."""
    if not all(hasattr(transform, name) for name in ("crop_box", "resize_size", "crop_size", "normalizer")):
        raise PipelineError(f"--decode device runs torchvision's resize-and-crop recipe, not {transform!r}; "
                            f"use --decode cpu for this model")
    jpeg_decoder(device)


def jpeg_decoder(device):
    """The first of TorchCodec's decode_jpeg and torchvision's own (deprecated since 0.29, nvJPEG as well) that
    decodes a tiny JPEG on `device`, so that a build without this CUDA fails here, not file by file
    -> decode(list of encoded uint8 tensors) -> list of uint8 [3, H, W] on `device`."""
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(probe, "JPEG")
    probe = torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)
    reasons = []
    for name, load in (("TorchCodec", _torchcodec_decoder), ("torchvision", _torchvision_decoder)):
        try:
            decode = _after_queued_work(load(device), device)
            decode([probe])
            return decode
        except ImportError as e:
            reasons.append(f"{name}: not installed ({one_line(e)})")
        except Exception as e:  # e.g. a build for another CUDA than torch's, or one without CUDA
            reasons.append(f"{name}: {one_line(e)}")
    raise PipelineError(f"no JPEG decoder decodes on {device} ({'; '.join(reasons)}); pip install -e '.[gpu]' "
                        f"(make extract DECODE=device installs TorchCodec), a TorchCodec build for torch's CUDA, "
                        f"or --decode cpu")


def _after_queued_work(decode, device):
    """`decode`, called once the work queued on the caller's CUDA stream has run. nvJPEG's hardware engine
    (on an A100, H100, H200) writes its output before that work runs, into memory the caching allocator
    handed out as free once the work was queued: the codes of earlier images came out wrong (on an H200,
    MobileNetV2 codes at cosine 0.16 to the CPU's), as in torchvision#9606 and torchcodec#1634."""
    device = torch.device(device)
    if device.type != "cuda":
        return decode

    def after_queued_work(datas):
        torch.cuda.current_stream(device).synchronize()
        return decode(datas)
    return after_queued_work


def _torchcodec_decoder(device):
    from torchcodec.decoders import decode_jpeg

    return lambda datas: list(decode_jpeg(datas, mode="RGB", device=device))


def _torchvision_decoder(device):
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas):
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's, used first
            warnings.simplefilter("ignore", DeprecationWarning)
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    return decode


def plain_jpeg(data):
    """Whether the device decoder may take these bytes: a whole baseline-or-progressive JPEG in RGB or
    greyscale, not turned by EXIF, within PIL's decompression-bomb limit."""
    return _plain_jpeg_pixels(data) > 0


def _plain_jpeg_pixels(data):
    """The pixel count of a JPEG plain_jpeg lets through; 0 for any other bytes."""
    if not data.rstrip(b"\0").endswith(_EOI):
        return 0  # cut short (or with bytes after its end): PIL on the CPU says which
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only
            pixels = img.size[0] * img.size[1]
            check_pixel_count(pixels)
            plain = img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(_ORIENTATION, 1) == 1
            return pixels if plain else 0
    except Exception:  # not an image, a header PIL cannot read, too many pixels: the CPU path gives the reason
        return 0


@dataclass
class Encoded:
    """One batch's images as the workers hand them over: the JPEGs' bytes end to end in one tensor, and
    the pixels of the images decoded in a worker (or blank) in another. A tensor per JPEG cost the
    DataLoader a shared-memory file each, and its main process more time than the decoding itself."""
    jpeg_bytes: torch.Tensor  # uint8 [all the JPEGs' bytes]
    jpeg_sizes: list          # bytes of each JPEG
    jpeg_pixels: list         # pixels of each JPEG (its header's width x height)
    jpeg_at: list             # each JPEG's position in the batch
    pixels: torch.Tensor      # uint8 [P, 3, crop, crop]
    pixels_at: list           # each one's position in the batch

    def jpegs(self):
        """Each JPEG's bytes, uint8 [N] views of jpeg_bytes."""
        return torch.split(self.jpeg_bytes, self.jpeg_sizes) if self.jpeg_sizes else ()


class EncodedRows(Dataset):
    """Rows of an image source as (row, bytes uint8 [N] or pixels uint8 [3, crop, crop], sha256, failure,
    the JPEG's pixel count or 0)."""

    def __init__(self, source, transform, rows):
        self.source, self.transform, self.rows = source, transform, rows
        crop = transform.crop_size[0]
        self.blank = torch.zeros(3, crop, crop, dtype=torch.uint8)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        row = int(self.rows[k])
        path = self.source.file(row)
        try:
            if path is None:  # pixels in the source (an array data set): nothing to decode
                image, digest = self.source.load(row)
                return row, self.transform(image), digest, "", 0
            data = read_image_bytes(path)
            digest = hashlib.sha256(data).hexdigest()
            pixels = _plain_jpeg_pixels(data)
            if pixels:
                return row, torch.frombuffer(bytearray(data), dtype=torch.uint8), digest, "", pixels
            return row, self.transform(decode_image(data)), digest, "", 0
        except ImageDecodeError as e:
            return row, self.blank, "", str(e) or "cannot decode", 0


def _to_batch(items):
    """The DataLoader's collate_fn: items of EncodedRows -> one Batch whose images are Encoded."""
    rows, images, digests, failures, pixels = zip(*items)
    jpeg_at = [k for k, count in enumerate(pixels) if count]
    pixels_at = [k for k, count in enumerate(pixels) if not count]
    nothing = torch.empty(0, dtype=torch.uint8)
    encoded = Encoded(torch.cat([images[k] for k in jpeg_at]) if jpeg_at else nothing,
                      [len(images[k]) for k in jpeg_at], [pixels[k] for k in jpeg_at], jpeg_at,
                      torch.stack([images[k] for k in pixels_at]) if pixels_at else nothing, pixels_at)
    return Batch(np.array(rows, dtype=np.int64), encoded, list(digests), list(failures))


def encoded_batches(source, transform, rows, batch_size, num_workers):
    """A DataLoader of Batch records whose images are Encoded: JPEGs' bytes, and pixels decoded in the workers."""
    return DataLoader(EncodedRows(source, transform, rows), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=_to_batch, prefetch_factor=4 if num_workers else None)


def decoded_on(device, batches, transform, ahead=None):
    """Yield each Batch of `batches` with its images decoded, resized and cropped on `device`: uint8
    [B, 3, crop, crop]. `ahead`: batches a thread of its own decodes ahead of the caller (on a GPU, on a
    CUDA stream of its own; nvJPEG lets go of the GIL), DECODE_AHEAD on a GPU, none elsewhere."""
    decode = jpeg_decoder(device)
    decoded = (_decode_batch(batch, transform, device, decode) for batch in batches)
    ahead = (DECODE_AHEAD if device.type == "cuda" else 0) if ahead is None else ahead
    return _made_ahead(decoded, ahead, device) if ahead else decoded


def _made_ahead(batches, ahead, device):
    """Yield the Batches of iterator `batches`, made by a thread up to `ahead` batches early; on a GPU the
    thread queues its work on a stream of its own, and each batch's images are ready on the caller's stream."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    made, stop, end = Queue(ahead), threading.Event(), object()

    def hand_over(item):
        while not stop.is_set():
            try:
                return made.put(item, timeout=0.1)
            except Full:
                continue

    def make():
        try:
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for batch in batches:
                    hand_over((batch, stream.record_event() if stream else None))
                    if stop.is_set():
                        return
            hand_over((end, None))
        except BaseException as e:  # noqa: BLE001 - raised again where the batches are used
            hand_over((e, None))

    thread = threading.Thread(target=make, name="decode", daemon=True)
    thread.start()
    try:
        while True:
            batch, ready = made.get()
            if batch is end:
                return
            if isinstance(batch, BaseException):
                raise batch
            if ready is not None:
                caller = torch.cuda.current_stream(device)
                caller.wait_event(ready)
                batch.images.record_stream(caller)  # not handed out again before the caller's work is done
            yield batch
    finally:
        stop.set()
        with contextlib.suppress(Empty):
            made.get_nowait()  # a thread waiting to hand over sees the stop
        thread.join()


def _decode_batch(batch, transform, device, decode):
    """`batch` with its Encoded images made uint8 [B, 3, crop, crop] on `device`; a JPEG that cannot be
    decoded is left at zeros, its failure and sha256 set as the CPU path sets them."""
    encoded, crop = batch.images, transform.crop_size[0]
    images = torch.empty(len(batch), 3, crop, crop, dtype=torch.uint8, device=device)
    if encoded.pixels_at:
        images[encoded.pixels_at] = encoded.pixels.to(device, non_blocking=True)
    jpegs = encoded.jpegs()
    for chunk in _chunks(encoded.jpeg_pixels, DECODE_PIXELS):
        pictures = {}  # (height, width) -> {k: uint8 [3, H, W]}: one resize per size, not per picture
        decoded = _decode_jpegs([jpegs[j] for j in chunk], device, decode)
        for k, picture in zip((encoded.jpeg_at[j] for j in chunk), decoded):
            if isinstance(picture, ImageDecodeError):
                images[k], batch.sha256[k], batch.failures[k] = 0, "", str(picture) or "cannot decode"
            else:
                pictures.setdefault(tuple(picture.shape[1:]), {})[k] = picture
        for same_size in pictures.values():
            resized = F.resize(torch.stack(list(same_size.values())), list(transform.resize_size), antialias=True)
            images[list(same_size)] = F.center_crop(resized, [crop])
    batch.images = images
    return batch


def _chunks(pixels, budget):
    """Consecutive index ranges of `pixels`, each summing to at most `budget` (or one item over it)."""
    start, total = 0, 0
    for k, count in enumerate(pixels):
        if total and total + count > budget:
            yield range(start, k)
            start, total = k, 0
        total += count
    if start < len(pixels):
        yield range(start, len(pixels))


def _decode_jpegs(datas, device, decode):
    """Encoded JPEGs -> per JPEG, uint8 [3, H, W] on `device`, or the ImageDecodeError why it cannot be."""
    if not datas:
        return []
    try:
        return decode(datas)  # one call for the batch
    except RuntimeError:  # one bad file fails the whole call: decode them one by one
        return [_decode_one(data, device, decode) for data in datas]


def _decode_one(data, device, decode):
    try:
        return decode([data])[0]
    except RuntimeError:
        try:
            image = decode_image(data.numpy().tobytes())  # PIL decodes what the decoder refused, or says why not
        except ImageDecodeError as e:
            return e
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(device)
