"""hardware.py: device and precision policy."""
import gc
import os
import weakref

import pytest
import torch

from pipeline.errors import PipelineError, PipelineWarning
from pipeline.hardware import (collector_skips_existing, cpu_name, default_batch_size, default_workers,
                               describe_device, resolve_device, resolve_precision)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    if native and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no mkldnn bf16 on this CPU at all")
    assert resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.filterwarnings("ignore::pipeline.errors.PipelineWarning")  # fp16 on a CPU without it: tested below
def test_precision_asked_for_is_kept_and_unknown_is_refused():
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    with pytest.raises(PipelineError, match="unknown precision 'fp8'; use one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("bf16, fp16", [(True, True), (True, False), (False, False)])
def test_bf16_or_fp16_asked_for_on_a_cpu_without_its_instructions_is_kept_with_a_warning(monkeypatch, recwarn,
                                                                                         bf16, fp16):
    monkeypatch.setattr("pipeline.hardware.native_cpu_bf16", lambda: bf16)
    monkeypatch.setattr("pipeline.hardware.native_cpu_fp16", lambda: fp16)  # (True, False): a Zen 4 EPYC
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("auto", cpu) == ("bf16" if bf16 else "fp32")
    assert not recwarn.list
    for precision, native in (("bf16", bf16), ("fp16", fp16)):
        if native:
            assert resolve_precision(precision, cpu) == precision and not recwarn.list
        else:
            with pytest.warns(PipelineWarning, match=f"PRECISION={precision} on this CPU .*without {precision} "
                                                     "instructions.* is emulated, many times slower than fp32 .*; "
                                                     "use PRECISION=auto "
                                                     f"\\({'bf16' if bf16 else 'fp32'} here\\)"):
                assert resolve_precision(precision, cpu) == precision


def test_devices_and_their_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = resolve_device("auto")
    assert cpu.type == "cpu" and default_workers(cpu) == 0 and default_batch_size(cpu) == 32
    with pytest.raises(PipelineError, match="DEVICE=cuda asked for but torch sees no CUDA GPU; use DEVICE=cpu"):
        resolve_device("cuda")
    with pytest.raises(PipelineError, match="unknown DEVICE 'gpu0'"):
        resolve_device("gpu0")
    gpu = torch.device("cuda")
    assert default_batch_size(gpu) == 256
    for cores, workers in [(1, 1), (2, 1), (16, 15), (96, 32)]:  # every core but the one feeding the GPU
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        assert default_workers(gpu) == workers


def test_a_cpu_is_described_by_its_model_name_cores_and_threads():
    import os
    import platform
    text = describe_device(torch.device("cpu"))
    assert text == f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    if os.path.exists("/proc/cpuinfo"):  # Linux: the model name, where `platform` often knows only 'x86_64'
        with open("/proc/cpuinfo") as f:
            names = [line.partition(":")[2].strip() for line in f if line.startswith("model name")]
        assert cpu_name() == (names[0] if names else platform.processor() or platform.machine())


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_is_bf16_from_ampere_on(monkeypatch, capability, expected):
    """A T4 (7.5) or V100 (7.0) makes bf16 tensors, so torch.cuda.is_bf16_supported() says yes by default
    (emulation counts); auto picks fp16 there, where the GPU computes it natively."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", torch.device("cuda", 1)) == expected and asked == [torch.device("cuda", 1)]


class Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.itself = self


def test_the_collector_skips_the_objects_alive_before_the_block_and_collects_the_new_ones():
    old = Cycle()
    old_ref = weakref.ref(old)
    with collector_skips_existing():
        del old
        new = Cycle()
        new_ref = weakref.ref(new)
        del new
        gc.collect()
        assert old_ref() is not None and new_ref() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # handed back to the collector at the end


def test_a_callers_own_freeze_is_left_as_it_is():
    gc.freeze()
    try:
        with collector_skips_existing():
            pass
        assert gc.get_freeze_count() > 0  # still frozen (the count itself falls as frozen objects are freed)
    finally:
        gc.unfreeze()
