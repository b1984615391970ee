"""EngineConfig.fp8_decode: the opt-in attention reads of FP8 caches ("hw", "hw-staged": NVIDIA's e4m3fn
conversion, other last bits than auto's) reach the kernels of a runner whose pool is FP8, and are refused, naming
the setting, where they cannot apply."""

from __future__ import annotations

import pytest
import torch

from miniserve import LLM
from miniserve.config import EngineConfig, SettingError
from miniserve.engine import model_runner
from miniserve.kernels import decode_attention as decode_module
from miniserve.kernels import extend_attention as extend_module
from miniserve.kernels import ops


@pytest.mark.parametrize("mode", ["hw", "hw-staged"])
@pytest.mark.parametrize("kw", [dict(kv_cache_dtype="fp8"), dict()])
def test_hw_modes_are_refused_off_nvidia_or_without_an_fp8_pool(kw, mode):
    with pytest.raises(SettingError, match=f"fp8_decode='{mode}' needs an NVIDIA GPU and kv_cache_dtype=fp8"):
        LLM(device="cpu", fp8_decode=mode, **kw)


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(SettingError, match="fp8_decode must be one of auto, hw, hw-staged"):
        EngineConfig(fp8_decode="bits")


def test_the_mode_reaches_every_attention_layer_of_an_fp8_runner(monkeypatch):
    """On a CPU the runner cannot be on an NVIDIA GPU, so set_fp8_decode is told it is: every attention module of
    an FP8 target then carries the mode, while a draft with a bf16 pool keeps auto."""
    monkeypatch.setattr(torch.version, "hip", None)
    model = LLM(device="cpu", enforce_eager=True).engine.target.model
    model_runner.set_fp8_decode(model, "hw-staged", torch.float8_e4m3fn, torch.device("cuda"), "target")
    modes = [m.fp8_decode for m in model.modules() if hasattr(m, "fp8_decode")]
    assert len(modes) == 8 and set(modes) == {"hw-staged"}  # the demo target's 8 layers
    draft = LLM(device="cpu", enforce_eager=True).engine.target.model
    model_runner.set_fp8_decode(draft, "hw-staged", torch.bfloat16, torch.device("cuda"), "draft")
    assert {m.fp8_decode for m in draft.modules() if hasattr(m, "fp8_decode")} == {"auto"}


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
        parts = None

    q = torch.zeros(3, 4, 16)
    cache = torch.zeros(2, 16, 2, 16, dtype=torch.float8_e4m3fn)
    ops.paged_attention(q, cache, cache, Meta(), None, None, 0.25, backend="triton", fp8_decode="hw-staged")
    assert seen == {"decode" if decode else "extend": "hw-staged"}
