"""The skinny Triton GEMM (kernels/linear.py) in the CPU interpreter against an fp64 product, its launch
configurations at their boundaries, when `linear` picks it over cuBLAS, and the engine's dependent-launch switch.

Oracle: the exact product in fp64 (no shared code with the kernel). The kernel accumulates in fp32 and rounds once
to the output dtype, so every output is within half an ulp of the dtype of the exact value plus fp32's
accumulation error (the bound allows one ulp). The interpreter runs fp16: it has no bf16 arithmetic of its own (the
layer ops pass bf16 as int16 bits for that reason), and the kernel is the same code for both 16-bit dtypes; bf16 is
checked on GPUs (benchmarks/gpu_kernels.py `skinny_linear`).
"""

import os
from dataclasses import fields

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from miniserve.config import DEMO_TARGET, EngineConfig  # noqa: E402
from miniserve.engine.model_runner import ModelRunner, set_dependent_launch  # noqa: E402
from miniserve.kernels import linear as linear_module  # noqa: E402
from miniserve.kernels.dependent_launch import DEPENDENT_MAX_TOKENS  # noqa: E402
from miniserve.kernels.layer_ops import silu_and_mul  # noqa: E402
from miniserve.kernels.linear import (  # noqa: E402
    SKINNY_MAX_ROWS,
    gate_up_config,
    linear,
    linear_silu_and_mul,
    skinny_config,
    skinny_linear,
)

ULP = 2**-10  # fp16
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def assert_close_to_exact(out, x, w, bias=None):
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = ULP * exact.abs() + 2**-20 * (x.double().abs() @ w.double().abs().T) + 1e-30
    err = (out.double() - exact).abs()
    assert out.dtype == x.dtype and out.shape == exact.shape
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst ratio {(err / bound).max():.3g}"


@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 48, 512),
        (5, 40, 768),
        (16, 24, 256),
        (17, 72, 256),
        (64, 40, 128),
        (3, 12288, 32),
        (3, 40, 3072),
        (40, 40, 3072),
    ],
    ids=lambda v: str(v),
)
def test_skinny_linear_matches_the_exact_product(m, n, k):
    """Ragged column blocks (n not a multiple of 16/32/64), rows at the 16/64-row block edges, K steps that
    shrink to divide K (768 -> 256), one wide weight's 64-column slices, split reductions (3072 into 40 columns)."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).half()
    w = (torch.randn(n, k, generator=g) * 0.05).half()
    assert_close_to_exact(skinny_linear(x, w), x, w)


@pytest.mark.parametrize("split", [2, 3, 4])
def test_split_reduction_sums_its_parts_and_resets_its_counters(split):
    """A reduction split in parts: every tile's parts are summed once (a part lost or counted twice fails the
    bound), with the bias, and each tile's arrival counter is back at zero for the next launch."""
    g = torch.Generator().manual_seed(split)
    x = torch.randn(20, 96 * split, generator=g).half()
    w = (torch.randn(40, 96 * split, generator=g) * 0.05).half()
    bias = torch.randn(40, generator=g).half()
    for rows in (20, 1):
        out = skinny_linear(x[:rows], w, bias, config=(16, 16, 32, 2, 3, split))
        assert_close_to_exact(out, x[:rows], w, bias)
        assert not linear_module._tile_counters(x.device).any()


def test_only_split_launches_are_bounded_by_the_tile_counters(monkeypatch):
    """The arrival counters bound a split launch's output tiles, and only a split launch's: an unsplit one with more
    tiles than counters runs."""
    monkeypatch.setattr(linear_module, "TILE_COUNTERS", 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, generator=g).half()
    w = (torch.randn(48, 64, generator=g) * 0.05).half()  # 3 tiles of 16 columns
    assert_close_to_exact(skinny_linear(x, w, config=(16, 16, 32, 2, 3, 1)), x, w)
    assert_close_to_exact(skinny_linear(x[:, :32], w[:2 * 16, :32], config=(16, 16, 16, 2, 3, 2)), x[:, :32],
                          w[:32, :32])  # fmt: skip
    with pytest.raises(ValueError, match="split-K over 3 output tiles, more than 2"):
        skinny_linear(x, w, config=(16, 16, 32, 2, 3, 2))


def test_skinny_linear_bias_and_strided_rows():
    """The bias is added in fp32 before the one rounding; rows may be a view with a wider row stride (a slice of
    a packed tensor), columns contiguous."""
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(6, 300, generator=g).half()
    x = wide[:, :256]
    w = (torch.randn(40, 256, generator=g) * 0.05).half()
    bias = torch.randn(40, generator=g).half()
    out = skinny_linear(x, w, bias)
    assert_close_to_exact(out, x, w, bias)
    assert not torch.equal(out, skinny_linear(x, w))  # the bias is really added
    assert skinny_linear(x[:0], w).shape == (0, 40)
    with pytest.raises(ValueError, match="K % 96 == 0"):
        skinny_linear(x, w, config=(16, 32, 96, 2, 3, 1))
    with pytest.raises(ValueError, match="K % 256 == 0"):
        skinny_linear(x[:, :128], w[:, :128], config=(16, 32, 128, 2, 3, 2))


@pytest.mark.parametrize(
    "m,inter,k,config",
    [
        (1, 40, 512, None),
        (5, 64, 256, (16, 16, 128, 2, 3, 1)),
        (16, 24, 256, None),
        (17, 72, 256, None),
        (64, 40, 128, (64, 32, 64, 4, 3, 1)),
    ],  # fmt: skip
    ids=str,
)
def test_gate_up_with_silu_and_mul_is_the_gemm_then_the_layer_op(m, inter, k, config):
    """The fused gate/up launch against what it replaces, bit for bit: the same GEMM storing [gate, up] and
    layer_ops' SiLU kernel on that (a column's sums do not depend on the slice width; on GPUs not on the K step
    either, but the interpreter sums a step at once, so both take the same). And against fp64
    SiLU(x Wg^T) * (x Wu^T) within three ulps (the two roundings of the product, SiLU's own): an up column read
    from the wrong rows, or gate and up swapped, is far outside that. fp16, like the module's other tests; bf16
    (the epilogue's other branch) on GPUs: benchmarks/gpu_kernels.py `gate_up_silu`."""
    g = torch.Generator().manual_seed(m * 100 + inter)
    x = torch.randn(m, k, generator=g).half()
    w = (torch.randn(2 * inter, k, generator=g) * 0.05).half()
    config = config or gate_up_config(m, k, inter)
    stacked = (config[0], 2 * config[1], *config[2:])
    two_launch = silu_and_mul(skinny_linear(x, w, config=stacked), backend="triton")
    fused = skinny_linear(x, w, config=config, silu_mul=True)
    assert fused.shape == (m, inter) and fused.dtype == x.dtype
    assert torch.equal(fused.view(torch.int16), two_launch.view(torch.int16))
    prod = x.double() @ w.double().T
    exact = F.silu(prod[:, :inter]) * prod[:, inter:]
    err = (fused.double() - exact).abs()
    bound = 3 * ULP * (exact.abs() + prod[:, inter:].abs() * 2**-9) + 1e-30
    assert bool((err <= bound).all()), f"worst ratio {(err / bound).max():.3g}"


def test_gate_up_config():
    """32 gate + 32 up columns a program in 128-wide steps (narrower where 128 does not divide K), 16- or 64-row
    blocks at the 16/17-row edge, 5 stages below 12288 stacked columns and 3 from there, fewer where shared memory
    runs out; never a split reduction."""
    assert gate_up_config(16, 2048, 8192) == (16, 32, 128, 4, 3, 1)
    assert gate_up_config(17, 2048, 8192) == (64, 32, 128, 4, 3, 1)
    assert gate_up_config(1, 1024, 6144)[4] == 3 and gate_up_config(1, 1024, 6143)[4] == 5
    assert gate_up_config(64, 1024, 3072) == (64, 32, 128, 4, 5, 1)
    assert gate_up_config(1, 96, 64)[2] == 32 and gate_up_config(1, 24, 64) is None
    # a 64-row stage is 2 x (64 + 64) x 128 bytes = 32 KiB
    assert (
        gate_up_config(64, 1024, 64, 5 * 32 << 10)[4] == 5 and gate_up_config(64, 1024, 64, (5 * 32 << 10) - 1)[4] == 4
    )
    assert gate_up_config(1, 14336 * 2, 3584)[5] == 1  # a long reduction into few columns: still one part


def test_linear_silu_and_mul_fuses_only_where_the_skinny_gemm_runs(monkeypatch):
    """pdl and a fitting shape: one fused launch; otherwise cuBLAS then the layer op, bit for bit."""
    calls = []
    monkeypatch.setattr(linear_module, "skinny_linear", lambda *a, **kw: calls.append(kw) or a[0][:, :16])
    monkeypatch.setattr(linear_module, "device_limits", lambda device: (200 << 10, 132))
    w = torch.randn(32, 64).half()
    for rows, pdl, picked in [(SKINNY_MAX_ROWS, True, True), (SKINNY_MAX_ROWS + 1, True, False), (1, False, False)]:
        calls.clear()
        x = torch.randn(rows, 64).half()
        out = linear_silu_and_mul(x, w, "torch", pdl)
        assert [c.get("silu_mul") for c in calls] == ([True] if picked else [])
        if not picked:
            assert torch.equal(out, silu_and_mul(F.linear(x, w), "torch"))


def test_skinny_config_boundaries():
    assert skinny_config(16, 2048, 3072)[0] == 16 and skinny_config(17, 2048, 3072)[0] == 64
    assert skinny_config(1, 2048, 12288)[1] == 64 and skinny_config(1, 2048, 12287)[1] == 16
    assert skinny_config(32, 2048, 3072)[1] == 32 and skinny_config(32, 2048, 3071)[1] == 16
    assert skinny_config(64, 4096, 6144)[1:3] == (64, 256) and skinny_config(64, 4096, 6143)[1:3] == (32, 256)
    assert skinny_config(1, 768, 256)[2] == 256  # 512 does not divide 768
    assert skinny_config(1, 3584, 256)[2::3] == (256, 2)  # split in two: 512 does not divide 3584 / 2
    assert skinny_config(1, 16, 256)[2] == 16
    assert skinny_config(1, 24, 256) is None  # no step of 16..512 divides 24
    # the pipeline fits the shared memory: 64 x 256 + 256 x 16 bf16 tiles are 40 KiB a stage
    assert skinny_config(64, 2048, 2048)[4] == 4 and skinny_config(64, 2048, 2048, 4 * 40 << 10)[4] == 4
    assert skinny_config(64, 2048, 2048, (4 * 40 << 10) - 1)[4] == 3 and skinny_config(64, 2048, 2048, 99 << 10)[4] == 2
    for m, k, n in [(1, 2048, 3072), (8, 14336, 4096), (64, 1024, 4096), (40, 3072, 1024), (64, 8192, 2048)]:
        config = skinny_config(m, k, n)
        assert k % (config[2] * config[5]) == 0


def test_split_depends_on_the_weight_only():
    """The reduction is split in two where the weight has fewer 16-column slices than the GPU has SMs and each half
    still takes 3 steps of 512 (Llama-3.2-1B's down projection, 8192 x 2048; Qwen3-0.6B's, 3072 x 1024), at every
    row count, so that a row's bits do not depend on the rows beside it."""
    cases = [(8192, 2048, 132, 2), (3072, 1024, 132, 2), (3056, 1024, 132, 1), (2048, 2048, 132, 1),
             (14336, 4096, 132, 1), (8192, 2096, 132, 2), (8192, 2112, 132, 1), (8192, 2112, 133, 2)]  # fmt: skip
    for k, n, sms, split in cases:
        assert {skinny_config(m, k, n, sms=sms)[5] for m in range(1, SKINNY_MAX_ROWS + 1)} == {split}, (k, n, sms)


def test_linear_uses_the_skinny_gemm_only_when_launching_dependents(monkeypatch):
    """pdl and at most SKINNY_MAX_ROWS rows of a 16-bit dtype: the Triton GEMM (launched as a dependent);
    anything else: F.linear, bit for bit."""
    calls = []
    monkeypatch.setattr(linear_module, "skinny_linear", lambda x, w, b, cfg, pdl: calls.append((len(x), pdl)) or x)
    monkeypatch.setattr(linear_module, "device_limits", lambda device: (200 << 10, 132))  # an H200's
    w = torch.randn(32, 64).to(torch.bfloat16)
    for rows, pdl, dtype, picked in [
        (SKINNY_MAX_ROWS, True, torch.bfloat16, True),
        (SKINNY_MAX_ROWS + 1, True, torch.bfloat16, False),
        (1, False, torch.bfloat16, False),
        (1, True, torch.float32, False),
    ]:
        calls.clear()
        x = torch.randn(rows, 64).to(dtype)
        out = linear(x, w.to(dtype), pdl=pdl)
        assert calls == ([(rows, True)] if picked else [])
        if not picked:
            assert torch.equal(out, F.linear(x, w.to(dtype)))
    calls.clear()
    linear(torch.randn(8, 128).to(torch.bfloat16)[:, ::2], w, pdl=True)  # strided columns: cuBLAS
    assert calls == []


def test_dependent_launch_setting_sets_the_models_token_limit(monkeypatch):
    """EngineConfig.dependent_launch: "auto" gives the model its token limit where the GPU supports it (faked
    here), "off" none, and the torch backend (the CPU) none either; the model is built without one."""
    help_text = next(f.metadata["help"] for f in fields(EngineConfig) if f.name == "dependent_launch")
    assert f"passes of up to {DEPENDENT_MAX_TOKENS} tokens" in help_text  # the setting's help says the limit
    runner = ModelRunner(EngineConfig(device="cpu"), str(DEMO_TARGET), "target", "auto")
    assert runner.model.dependent_tokens == 0
    monkeypatch.setattr("miniserve.engine.model_runner.dependent_launch_supported", lambda device: True)
    set_dependent_launch(runner.model, "auto", "triton", runner.device)
    assert runner.model.dependent_tokens == DEPENDENT_MAX_TOKENS
    set_dependent_launch(runner.model, "off", "triton", runner.device)
    assert runner.model.dependent_tokens == 0
    set_dependent_launch(runner.model, "auto", "torch", runner.device)
    assert runner.model.dependent_tokens == 0


def test_passes_up_to_the_token_limit_launch_as_dependents(monkeypatch):
    """With dependent launch on, a pass of DEPENDENT_MAX_TOKENS tokens asks every projection, norm, KV write and
    attention for it; one token more asks none (large batches lose with it: dependent_launch.py)."""
    import miniserve.models.llama as llama_module
    from miniserve import LLM
    from miniserve.engine.model_runner import ForwardInput

    llm = LLM(str(DEMO_TARGET), device="cpu", enforce_eager=True)
    worker = llm.engine.target
    worker.model.dependent_tokens = DEPENDENT_MAX_TOKENS
    asked = []

    def recorder(fn, pdl_at):
        def call(*args, **kw):
            asked.append(kw.pop("pdl", args[pdl_at] if len(args) > pdl_at else False))
            return fn(*args[:pdl_at], **kw)

        return call

    monkeypatch.setattr(llama_module, "linear", recorder(lambda x, w, b=None: F.linear(x, w, b), 3))
    monkeypatch.setattr(llama_module, "rms_norm", recorder(llama_module.rms_norm, 5))
    monkeypatch.setattr(llama_module, "linear_silu_and_mul", recorder(llama_module.linear_silu_and_mul, 3))
    monkeypatch.setattr(llama_module, "reshape_and_cache", recorder(llama_module.reshape_and_cache, 9))
    monkeypatch.setattr(llama_module, "paged_attention", recorder(llama_module.paged_attention, 10))
    layers = worker.model_config.num_layers
    for tokens, want in ((DEPENDENT_MAX_TOKENS, True), (DEPENDENT_MAX_TOKENS + 1, False)):
        asked.clear()
        worker.forward([ForwardInput(list(range(5, 5 + tokens)), 0, list(range(tokens // 16 + 1)), 1)])
        assert len(asked) == 8 * layers + 1 and set(asked) == {want}  # 3 GEMMs, gate/up + SiLU, 2 norms, write, attn
    llm.shutdown()


def test_release_point_experiment_passes_the_engines_calls_through():
    """benchmarks/release_point_ab.py swaps `skinny_linear` for a wrapper while the engine runs: every call the
    engine makes (`linear`'s, `linear_silu_and_mul`'s) must reach the kernel unchanged but for the release point."""
    from benchmarks.release_point_ab import early

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 64, generator=g).half()
    w = (torch.randn(64, 64, generator=g) * 0.05).half()
    assert torch.equal(early(x, w, None, skinny_config(3, 64, 64)), skinny_linear(x, w))
    fused = early(x, w, None, gate_up_config(3, 64, 32), silu_mul=True)
    assert torch.equal(fused, skinny_linear(x, w, silu_mul=True))
