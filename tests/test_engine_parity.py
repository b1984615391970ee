"""miniserve against Hugging Face transformers on tiny random checkpoints of each supported architecture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from miniserve import LLM, SamplingParams
from miniserve.config import EngineConfig
from miniserve.engine.llm_engine import LLMEngine
from miniserve.engine.model_runner import ForwardInput
from tests.conftest import ARCHS, VOCAB, build_model_dir, hf_config, hf_greedy
from tests.fp8_oracle import quantize_bytes_tensor

ATOL = 1e-4


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", **kw))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 9, 30, 1, 12][:n]
    return [torch.randint(2, VOCAB, (n_,), generator=g).tolist() for n_ in lengths]


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def prompt_logits(eng: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Logits of every prompt position from one prefill through the target worker."""
    return eng.target.forward([ForwardInput(prompt, 0, alloc(eng, len(prompt)), len(prompt))])


def alloc(eng: LLMEngine, seq_len: int) -> list[int]:
    """A block table for a single sequence driven by hand through the worker."""
    return list(range(eng.block_manager.blocks_for(seq_len)))


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_match_transformers(model_dirs, arch):
    path = model_dirs[arch]
    hf, eng = hf_model(path), engine(path)
    prompt = prompts(4)[3]
    steps = 8
    table = alloc(eng, len(prompt) + steps)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), use_cache=True)
    ours = eng.target.forward([ForwardInput(prompt, 0, table, len(prompt))])
    assert (ours - ref.logits[0]).abs().max().item() <= ATOL
    past, tokens = ref.past_key_values, list(prompt)
    for _ in range(steps):
        nxt = int(ref.logits[0, -1].argmax())
        with torch.no_grad():
            ref = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = ref.past_key_values
        ours = eng.target.forward([ForwardInput([nxt], len(tokens), table, 1)])
        tokens.append(nxt)
        assert (ours[0] - ref.logits[0, -1]).abs().max().item() <= ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_equals_transformers_and_solo_runs(model_dirs, arch):
    path = model_dirs[arch]
    hf = hf_model(path)
    batch = prompts(5, seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", device="cpu")
    together = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in batch]
    expected = [hf_greedy(hf, p, 32) for p in batch]
    assert together == expected
    assert alone == expected


def test_rope_scaling_llama3_and_tied_embeddings(tmp_path, tokenizer_dir):
    scaling = LLAMA3_SCALING
    path = build_model_dir(
        tmp_path / "m",
        "LlamaForCausalLM",
        tokenizer_dir,
        seed=7,
        rope_scaling=scaling,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )
    hf, eng = hf_model(path), engine(path)
    prompt = torch.randint(2, VOCAB, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    ours = prompt_logits(eng, prompt)
    assert (ours - ref).abs().max().item() <= ATOL


def assert_a_128_token_context_matches_transformers(path: Path, seed: int) -> None:
    """A scaled-RoPE model whose context is 128 tokens: a 120-token prompt's logits match transformers', and its
    greedy output does until the context is full (8 tokens, finish_reason length, of the 20 asked for)."""
    hf, eng = hf_model(path), engine(path)
    assert eng.max_model_len == 128
    prompt = torch.randint(2, VOCAB, (120,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (prompt_logits(eng, prompt) - ref).abs().max().item() <= ATOL
    llm = LLM(str(path), dtype="float32", device="cpu")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert (out[0].outputs[0].token_ids, out[0].outputs[0].finish_reason) == (hf_greedy(hf, prompt, 8), "length")


def test_linear_rope_scaling_stretches_the_context(tmp_path, tokenizer_dir):
    """A linear RoPE factor stretches max_position_embeddings positions over factor times as many tokens (the 16k
    Llama-2 fine-tunes: max_position_embeddings=4096, factor 4): the context is their product, as vLLM derives it,
    and a prompt that long matches transformers (it was capped at max_position_embeddings, a longer one refused)."""
    scaling = {"rope_type": "linear", "factor": 4.0}
    path = build_model_dir(
        tmp_path / "m", "LlamaForCausalLM", tokenizer_dir, seed=2, max_position_embeddings=32, rope_scaling=scaling
    )
    assert_a_128_token_context_matches_transformers(path, seed=4)
    with pytest.raises(ValueError, match=r"context length 128 \(max_position_embeddings=32 x linear RoPE scaling"):
        engine(path, max_model_len=129)


YARN_SCALINGS = [
    {"factor": 4.0, "original_max_position_embeddings": 32},  # Qwen3's recipe (32k by 4), scaled down
    {"factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 0.9},
    # a ramp of zero width at dimension 2 exactly (base 10000, head_dim 16): transformers' 0.001 guard
    {
        "factor": 3.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 0.5092958178940651,
        "beta_slow": 0.5092958178940651,
        "truncate": False,
    },  # fmt: skip
    {"factor": 1.0, "original_max_position_embeddings": 32},  # no stretch: the attention factor is 1
]


@pytest.mark.parametrize("scaling", YARN_SCALINGS)
def test_yarn_rope_tables_equal_transformers(scaling):
    """YaRN's frequencies and attention factor, bit for bit as transformers' own (a zero-width ramp, DeepSeek's
    mscale pair, an explicit attention factor, no truncation)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from miniserve.models.config import ModelConfig
    from miniserve.models.llama import rope_attention_factor, rope_inv_freq

    yarn = {"rope_type": "yarn", **scaling}
    hf = hf_config("Qwen3ForCausalLM", max_position_embeddings=128, rope_theta=10000.0, rope_scaling=yarn)
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    ours = ModelConfig.from_dict(hf.to_dict() | {"architectures": ["Qwen3ForCausalLM"]})
    assert torch.equal(rope_inv_freq(ours), want_freq)
    assert rope_attention_factor(ours) == want_factor


def test_yarn_rope_scaling_stretches_the_context_and_matches_transformers(tmp_path, tokenizer_dir):
    """Qwen's long-context recipe (YaRN, factor 4 over the trained length): the context is the trained length
    times the factor, as vLLM derives it, and a prompt near that long matches transformers' logits and greedy
    output (yarn was refused)."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    path = build_model_dir(
        tmp_path / "m", "Qwen3ForCausalLM", tokenizer_dir, seed=3, max_position_embeddings=40, rope_scaling=scaling
    )
    assert_a_128_token_context_matches_transformers(path, seed=5)
    with pytest.raises(ValueError, match=r"128 \(original_max_position_embeddings=32 x yarn RoPE scaling factor 4"):
        engine(path, max_model_len=129)


def test_a_rope_scaling_number_that_is_not_one_is_named():
    from miniserve.models.config import ModelConfig

    sizes = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}
    scaling = {"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}
    raw = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2, "rope_scaling": scaling, **sizes}
    with pytest.raises(ValueError, match="yarn rope scaling's 'beta_fast' must be a number, got '32'"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_unbuilt_rope_scaling_is_refused_by_name(rope_type):
    from miniserve.models.config import ModelConfig

    sizes = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}
    scaling = {"rope_type": rope_type, "factor": 2.0}
    raw = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2, "rope_scaling": scaling, **sizes}
    with pytest.raises(
        ValueError, match=f"unsupported rope scaling type '{rope_type}' \\(supported: llama3, linear, yarn"
    ):
        ModelConfig.from_dict(raw)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tokenizer_dir, llama_dir):
    sharded = build_model_dir(tmp_path / "sharded", "LlamaForCausalLM", tokenizer_dir, seed=0, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    prompt = prompts(2)[1]
    a, b = engine(sharded), engine(llama_dir)
    la = prompt_logits(a, prompt)
    lb = prompt_logits(b, prompt)
    assert torch.equal(la, lb)


def test_missing_shard_is_a_clear_error(tmp_path, tokenizer_dir):
    path = build_model_dir(tmp_path / "broken", "LlamaForCausalLM", tokenizer_dir, max_shard_size="100KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        engine(path)


def test_a_pytorch_bin_checkpoint_is_named(tmp_path, llama_dir):
    """transformers saves pytorch_model.bin with safe_serialization=False; the error says that is what it found."""
    from miniserve.models.loader import checkpoint_files

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="it has pytorch_model.bin: PyTorch pickles are not loaded"):
        checkpoint_files(tmp_path)
    assert checkpoint_files(llama_dir) == [llama_dir / "model.safetensors"]


def test_missing_and_mismatched_tensors_are_named(tmp_path, tokenizer_dir, llama_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    broken = tmp_path / "missing"
    shutil.copytree(llama_dir, broken)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, broken / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp"):
        engine(broken)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*o_proj"):
        engine(broken)


def test_a_tensor_given_twice_is_named_not_counted_for_another(tmp_path, llama_dir):
    """gate_proj twice and no up_proj fill as many rows of the fused gate/up weight as both once: refused by name."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    broken = tmp_path / "twice"
    shutil.copytree(llama_dir, broken)
    (broken / "model.safetensors").unlink()
    gate = "model.layers.1.mlp.gate_proj.weight"
    rest = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(rest, broken / "model-00001-of-00002.safetensors")
    save_file({gate: tensors[gate]}, broken / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in rest} | {"extra": "model-00002-of-00002.safetensors"}
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"tensor '{gate}' fills rows that '{gate}' filled"):
        engine(broken)


def test_quantized_checkpoints_are_refused_by_name(tmp_path, llama_dir):
    """Quantized weights (here FP8 with per-tensor scales, as compressed-tensors stores them) are refused naming
    the quantization_config, or without one the tensor's dtype: an FP8 weight was copied as its codes, unscaled,
    into a model that loaded and wrote garbage. A KV-cache-only scheme (FP8 KV scales, plain weights) loads."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    quantized = {}
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            scale = w.abs().max() / 448
            quantized[name] = (w / scale).to(torch.float8_e4m3fn)
            quantized[name.removesuffix("weight") + "weight_scale"] = scale.reshape(1)
        else:
            quantized[name] = w
    path = tmp_path / "fp8"
    shutil.copytree(llama_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    scheme = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"targets": ["Linear"]}}}
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": scheme}))
    save_file(quantized, path / "model.safetensors")
    with pytest.raises(ValueError, match="unsupported quantization_config \\(quant_method 'compressed-tensors'\\)"):
        engine(path)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in quantized.items() if not k.endswith("weight_scale")}, path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight' is F8_E4M3"):
        engine(path)
    kv_only = {"quant_method": "compressed-tensors", "kv_cache_scheme": {"num_bits": 8, "type": "float"}}
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": kv_only}))
    save_file({**tensors, "model.layers.0.self_attn.k_scale": torch.tensor(0.5)}, path / "model.safetensors")
    assert engine(path, kv_cache_dtype="fp8").target.kv[0].k_scale.item() == 0.5


def test_unknown_architecture_is_a_clear_error(tmp_path, llama_dir):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        engine(bad)


def test_hub_style_config_loads_like_transformers5_style(tmp_path, tokenizer_dir):
    """config.json as Hub checkpoints spell it (rope_theta + rope_scaling) and as transformers >= 5 writes it
    (rope_parameters) give the same model."""
    import json

    scaling = LLAMA3_SCALING
    new = build_model_dir(
        tmp_path / "new", "LlamaForCausalLM", tokenizer_dir, seed=5, rope_scaling=scaling, rope_theta=500000.0
    )
    old = tmp_path / "old"
    shutil.copytree(new, old)
    cfg = json.loads((old / "config.json").read_text())
    assert "rope_parameters" in cfg
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}}
    (old / "config.json").write_text(json.dumps(cfg))
    prompt = torch.randint(2, VOCAB, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    a, b = engine(new), engine(old)
    la = prompt_logits(a, prompt)
    lb = prompt_logits(b, prompt)
    assert b.target.model_config.rope_scaling["rope_type"] == "llama3"
    assert torch.equal(la, lb)


def test_flat_rope_parameters_without_theta_keep_their_scaling(tmp_path, tokenizer_dir):
    """transformers reads a flat `rope_parameters` whose rope_theta sits at the top level of config.json; so must
    we (it was once taken for a per-layer-type dict and its llama3 scaling dropped)."""
    import json

    path = build_model_dir(
        tmp_path / "m", "LlamaForCausalLM", tokenizer_dir, seed=5, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0
    )
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_theta"] = cfg["rope_parameters"].pop("rope_theta")
    (path / "config.json").write_text(json.dumps(cfg))
    hf, eng = hf_model(path), engine(path)
    prompt = torch.randint(2, VOCAB, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (prompt_logits(eng, prompt) - ref).abs().max().item() <= ATOL


def test_per_layer_type_rope_parameters_take_the_full_attention_layers():
    """transformers 5 keys rope_parameters by layer type when layers differ; a model whose layers are all full
    attention runs with the "full_attention" entry, wherever it sits in the dict."""
    from miniserve.models.config import ModelConfig

    sizes = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    }
    raw = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2, "rope_parameters": rope, **sizes}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling["rope_type"] == "linear"


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_a_config_without_head_dim_takes_the_architectures_default(arch):
    """A config.json that leaves head_dim out gets what transformers' config class gives it (Qwen3's is 128, not
    hidden_size / heads; it was refused at load as a shape mismatch)."""
    import transformers

    from miniserve.models.config import ModelConfig

    sizes = {"vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1}
    raw = {"architectures": [arch], "num_attention_heads": 4, "num_key_value_heads": 2, **sizes}
    hf = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**raw)
    assert ModelConfig.from_dict(raw).head_dim == (getattr(hf, "head_dim", None) or 64 // 4)


@pytest.mark.parametrize("scaling", [{"type": "linear"}, {"rope_type": "llama3", "factor": "8"}])
def test_rope_scaling_without_a_factor_is_a_clear_error(scaling):
    """A linear or llama3 scaling without a numeric factor names the field (it was a KeyError or a TypeError)."""
    from miniserve.models.config import ModelConfig

    sizes = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}
    raw = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2, "rope_scaling": scaling, **sizes}
    with pytest.raises(ValueError, match="rope scaling needs a positive 'factor'"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize(
    ("arch", "field", "value"),
    [
        ("LlamaForCausalLM", "hidden_act", "gelu_pytorch_tanh"),
        ("Qwen2ForCausalLM", "hidden_act", "relu"),
        ("LlamaForCausalLM", "mlp_bias", True),
        ("LlamaForCausalLM", "attention_bias", True),
        ("Qwen3ForCausalLM", "attention_bias", True),
    ],
)
def test_config_fields_that_change_the_math_are_built_or_refused_by_name(model_dirs, tmp_path, arch, field, value):
    import json

    path = tmp_path / "m"
    shutil.copytree(model_dirs[arch], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"unsupported {field}"):
        engine(path)


@pytest.mark.parametrize(("arch", "field", "value"), [("LlamaForCausalLM", "hidden_act", "swish"),
                                                     ("MistralForCausalLM", "attention_bias", True)])  # fmt: skip
def test_config_fields_transformers_computes_the_same_with_load_and_match(tmp_path, tokenizer_dir, arch, field, value):
    """ "swish" is SiLU; Mistral's transformers model has no biases whatever attention_bias says."""
    path = build_model_dir(tmp_path / "m", arch, tokenizer_dir, seed=3, **{field: value})
    hf, eng = hf_model(path), engine(path)
    prompt = prompts(4)[3]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (prompt_logits(eng, prompt) - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, tokenizer_dir, dtype):
    """bf16/fp16 checkpoints: dtype="auto" on the CPU computes in float32 (matches transformers in float32),
    and the checkpoint's own dtype runs too (matches transformers in that dtype to half-precision rounding)."""
    name = str(dtype).split(".")[-1]
    path = build_model_dir(tmp_path / name, "Qwen2ForCausalLM", tokenizer_dir, seed=3, dtype=dtype)
    prompt = prompts(4)[3]
    auto = engine(path)
    assert auto.target.dtype == torch.float32
    ref32 = hf_model(path)
    with torch.no_grad():
        want32 = ref32(torch.tensor([prompt])).logits[0]
    got32 = prompt_logits(auto, prompt)
    assert (got32 - want32).abs().max().item() <= ATOL
    half = LLMEngine(EngineConfig(model=str(path), dtype=name, device="cpu"))
    assert half.target.dtype == dtype and half.target.kv_dtype == dtype
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0].float()
    got = prompt_logits(half, prompt)
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_checkpoint_kv_scales_are_used(tmp_path, tokenizer_dir, llama_dir):
    """FP8 checkpoints' per-layer k_scale/v_scale tensors become the cache scales, and the stored bytes are the
    quantization (the independent oracle) with those scales."""
    from safetensors.torch import load_file, save_file

    scaled = tmp_path / "scaled"
    shutil.copytree(llama_dir, scaled)
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.25)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.5)
    tensors["model.layers.1.self_attn.kv_scale"] = torch.tensor(2.0)
    save_file(tensors, scaled / "model.safetensors")
    eng = engine(scaled, kv_cache_dtype="fp8")
    kv = eng.target.kv
    assert [(x.k_scale.item(), x.v_scale.item()) for x in kv] == [(0.25, 0.5), (2.0, 2.0)]
    # e4m3fnuz (MI300) reads the same bits as half the value: the e4m3fn-calibrated scales are doubled, as vLLM's
    fnuz = engine(scaled, kv_cache_dtype="fp8_e4m3fnuz").target.kv
    assert [(x.k_scale.item(), x.v_scale.item()) for x in fnuz] == [(0.5, 1.0), (4.0, 4.0)]
    plain = engine(llama_dir)  # layer 0's K/V do not depend on the cache: compute them in full precision
    prompt = prompts(2)[1]
    captured = {}
    attn0 = plain.target.model.layers[0].self_attn

    def hook(module, args, kwargs):
        from miniserve.kernels.layer_ops import apply_rotary_reference_

        x, positions, rotary = args[0], args[1], args[2]
        qkv = torch.nn.functional.linear(x, module.qkv_weight, module.qkv_bias)
        q, k, v = qkv.split([module.q_size, module.kv_size, module.kv_size], dim=-1)
        q = q.reshape(-1, module.num_heads, module.head_dim)
        k = k.reshape(-1, module.num_kv_heads, module.head_dim)
        apply_rotary_reference_(q, k, positions, rotary.cos, rotary.sin)
        captured["k"], captured["v"] = k, v.view(-1, module.num_kv_heads, module.head_dim)

    handle = attn0.register_forward_pre_hook(hook, with_kwargs=True)
    plain.target.forward([ForwardInput(prompt, 0, [0, 1], 1)])
    handle.remove()
    eng.target.forward([ForwardInput(prompt, 0, [0, 1], 1)])
    slots = torch.arange(len(prompt))
    stored_k = kv[0].key_cache.view(-1, *kv[0].key_cache.shape[2:])[slots].view(torch.uint8)
    stored_v = kv[0].value_cache.view(-1, *kv[0].value_cache.shape[2:])[slots].view(torch.uint8)
    want_k = quantize_bytes_tensor(captured["k"], 0.25, torch.float8_e4m3fn)  # the checkpoint's scales
    want_v = quantize_bytes_tensor(captured["v"], 0.5, torch.float8_e4m3fn)
    assert torch.equal(stored_k, want_k) and torch.equal(stored_v, want_v)


def test_sliding_window_caps_the_context_with_a_warning(tmp_path, tokenizer_dir):
    path = build_model_dir(tmp_path / "mistral", "MistralForCausalLM", tokenizer_dir, sliding_window=64)
    with pytest.warns(UserWarning, match="sliding-window"):
        eng = engine(path)
    assert eng.max_model_len == 64
    with pytest.raises(ValueError, match="context length \\(max_model_len\\) is 64"):
        eng.add_request("r", list(range(2, 66)), SamplingParams(max_tokens=1))
    eng.add_request("r", list(range(2, 62)), SamplingParams(max_tokens=10, ignore_eos=True))
    outs = [o for _ in range(20) for o in eng.step() if o.finished]
    assert [(len(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs] == [(4, "length")]


WINDOW_CONFIGS = [
    ("MistralForCausalLM", {}),  # no key: transformers' default window
    ("MistralForCausalLM", {"sliding_window": None}),
    ("MistralForCausalLM", {"sliding_window": 64}),
    ("LlamaForCausalLM", {"sliding_window": 64}),  # a stray key Llama's attention never reads
    ("Qwen2ForCausalLM", {"sliding_window": 64}),  # without use_sliding_window
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}),  # all full
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 64}),  # max_window_layers' default, 28
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}),
    (
        "Qwen3ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]},
    ),  # fmt: skip
]


@pytest.mark.parametrize(("arch", "fields"), WINDOW_CONFIGS)
def test_a_sliding_window_is_read_where_transformers_uses_one(arch, fields):
    """The oracle is transformers' config class: a window is taken (and caps the context) exactly where some layer
    of its model attends within one."""
    from miniserve.models.config import ModelConfig

    sizes = {"vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 2}
    raw = {"architectures": [arch], "num_attention_heads": 4, "num_key_value_heads": 2, **sizes, **fields}
    hf = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**raw)
    if arch == "LlamaForCausalLM":
        want = None  # (LlamaAttention passes no window)
    elif arch == "MistralForCausalLM":
        want = hf.sliding_window
    else:
        want = hf.sliding_window if "sliding_attention" in hf.layer_types else None
    assert ModelConfig.from_dict(raw).sliding_window == want
