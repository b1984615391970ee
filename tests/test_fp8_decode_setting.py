"""EngineConfig.fp8_decode: the opt-in attention read of FP8 caches ("hw-staged", faster on Hopper, not bit-exact)
reaches the kernels of a runner whose pool is FP8, and is refused, naming the setting, where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from miniserve import LLM
from miniserve.config import EngineConfig, SettingError
from miniserve.engine import model_runner
from miniserve.kernels import decode_attention as decode_module
from miniserve.kernels import extend_attention as extend_module
from miniserve.kernels import ops


@pytest.mark.parametrize("kw", [dict(kv_cache_dtype="fp8"), dict()])
def test_hw_staged_is_refused_off_nvidia_or_without_an_fp8_pool(kw):
    with pytest.raises(SettingError, match="fp8_decode='hw-staged' needs an NVIDIA GPU and kv_cache_dtype=fp8"):
        LLM(device="cpu", fp8_decode="hw-staged", **kw)


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(SettingError, match="fp8_decode must be one of auto, hw-staged"):
        EngineConfig(fp8_decode="bits")


def test_the_mode_reaches_every_attention_layer_of_an_fp8_runner(monkeypatch):
    """On a CPU the check that the GPU is NVIDIA's cannot pass, so the runner is told it is on one; every
    attention module of the target then carries the mode, and the draft (bf16 pool) keeps auto."""

    class FakeDevice:  # what _set_fp8_decode reads: .type
        type = "cuda"

    monkeypatch.setattr(model_runner.ModelRunner, "device", FakeDevice(), raising=False)
    runner = model_runner.ModelRunner.__new__(model_runner.ModelRunner)
    runner.kv_dtype, runner.role = torch.float8_e4m3fn, "target"
    runner.model = LLM(device="cpu", enforce_eager=True).engine.target.model
    monkeypatch.setattr(torch.version, "hip", None)
    runner._set_fp8_decode("hw-staged")
    modes = [m.fp8_decode for m in runner.model.modules() if hasattr(m, "fp8_decode")]
    assert len(modes) == 8 and set(modes) == {"hw-staged"}  # the demo target's 8 layers
    runner.kv_dtype, runner.role = torch.bfloat16, "draft"
    runner.model = LLM(device="cpu", enforce_eager=True).engine.target.model
    runner._set_fp8_decode("hw-staged")
    assert {m.fp8_decode for m in runner.model.modules() if hasattr(m, "fp8_decode")} == {"auto"}


@pytest.mark.parametrize("decode", [True, False])
def test_paged_attention_passes_the_mode_to_the_kernel_it_picks(monkeypatch, decode):
    seen = {}

    def spy(name):
        def kernel(q, *args, fp8_decode="auto", **kwargs):
            seen[name] = fp8_decode
            return torch.zeros_like(q)

        return kernel

    monkeypatch.setattr(decode_module, "decode_attention", spy("decode"))
    monkeypatch.setattr(extend_module, "extend_attention", spy("extend"))

    class Meta:
        is_decode = decode

    q = torch.zeros(3, 4, 16)
    cache = torch.zeros(2, 16, 2, 16, dtype=torch.float8_e4m3fn)
    ops.paged_attention(q, cache, cache, Meta(), None, None, 0.25, backend="triton", fp8_decode="hw-staged")
    assert seen == {"decode" if decode else "extend": "hw-staged"}
