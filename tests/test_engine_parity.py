"""miniserve against Hugging Face transformers on tiny random checkpoints of each supported architecture."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from miniserve import LLM, SamplingParams
from miniserve.config import EngineConfig
from miniserve.engine import LLMEngine
from miniserve.worker import ForwardInput
from tests.conftest import ARCHS, VOCAB, build_model_dir, hf_greedy

ATOL = 1e-4


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", **kw))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 9, 30, 1, 12][:n]
    return [torch.randint(2, VOCAB, (n_,), generator=g).tolist() for n_ in lengths]


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
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
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
    ours = eng.target.forward([ForwardInput(prompt, 0, alloc(eng, len(prompt)), len(prompt))])
    assert (ours - ref).abs().max().item() <= ATOL


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tokenizer_dir, llama_dir):
    sharded = build_model_dir(tmp_path / "sharded", "LlamaForCausalLM", tokenizer_dir, seed=0, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    prompt = prompts(2)[1]
    a, b = engine(sharded), engine(llama_dir)
    la = a.target.forward([ForwardInput(prompt, 0, alloc(a, len(prompt)), len(prompt))])
    lb = b.target.forward([ForwardInput(prompt, 0, alloc(b, len(prompt)), len(prompt))])
    assert torch.equal(la, lb)


def test_missing_shard_is_a_clear_error(tmp_path, tokenizer_dir):
    path = build_model_dir(tmp_path / "broken", "LlamaForCausalLM", tokenizer_dir, max_shard_size="100KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        engine(path)


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


def test_unknown_architecture_is_a_clear_error(tmp_path, llama_dir):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        engine(bad)
