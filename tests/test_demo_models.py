"""The embedded Shakespeare demo pair: standard HF checkpoints, real quality, and miniserve == transformers."""

from __future__ import annotations

import json
import math
import time

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from conftest import CORPUS
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from miniserve import LLM, SamplingParams
from miniserve.config import DEMO_DIR, DEMO_DRAFT, DEMO_TARGET

DIRS = {"target": DEMO_TARGET, "draft": DEMO_DRAFT}
METRICS = json.loads((DEMO_DIR / "metrics.json").read_text())
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def hf_models() -> dict:
    torch.manual_seed(0)
    return {k: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for k, d in DIRS.items()}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_TARGET)


def sample_windows(tokenizer) -> list[torch.Tensor]:
    """The validation prefix stored in metrics.json, as [BOS] + window tokens (the script's protocol)."""
    sample = METRICS["validation_sample"]
    ids = tokenizer.encode(sample["text"], add_special_tokens=False)
    assert len(ids) == sample["tokens"]
    w = sample["window"]
    return [torch.tensor([tokenizer.bos_token_id] + ids[i : i + w]) for i in range(0, len(ids), w)]


@pytest.mark.parametrize("name", sorted(DIRS))
def test_directory_is_a_standard_hf_checkpoint(name):
    path = DIRS[name]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "bfloat16" and config["max_position_embeddings"] == 1024
    assert (path / "model.safetensors").stat().st_size < 16 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == METRICS["params"][name]
    gen = GenerationConfig.from_pretrained(path)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)

    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == ("<s>", "</s>", 1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    texts = [PROMPT, "ROMEO:\nBut soft, what light?", " two  spaces\tand a tab", "naïve café ☃ 🙂 日本", ""]
    texts.append(METRICS["validation_sample"]["text"][:3000])
    for text in texts:
        ids = tok.encode(text)
        assert ids == [1] + sp.encode(text)  # transformers' BPE == sentencepiece's, BOS added like Llama
        assert tok.decode(ids, skip_special_tokens=True) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Who art thou?"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<s>USER:\nWho art thou?\n\nASSISTANT:\n"


@pytest.mark.parametrize("name", sorted(DIRS))
def test_miniserve_greedy_equals_transformers(name, hf_models, tokenizer):
    llm = LLM(model=str(DIRS[name]), dtype="float32", device="cpu")
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert out.prompt_token_ids == ids[0].tolist()
    with torch.no_grad():
        ref = hf_models[name].generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32, pad_token_id=2
        )
    assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist()
    assert len(out.outputs[0].token_ids) == 32


def test_validation_perplexity_target_beats_draft_beats_unigram(hf_models, tokenizer):
    ppl, uni = METRICS["val_ppl"], METRICS["unigram_val_ppl"]
    assert ppl["target"] < ppl["draft"] < uni / 5
    assert METRICS["val_loss"]["target"] == pytest.approx(math.log(ppl["target"]))

    # Recompute with transformers in float32 on the validation prefix shipped in metrics.json.
    windows = sample_windows(tokenizer)
    nll, argmax = {}, {}
    with torch.no_grad():
        for name, model in hf_models.items():
            logits = [model(w[None, :-1]).logits[0] for w in windows]
            targets = torch.cat([w[1:] for w in windows])
            nll[name] = F.cross_entropy(torch.cat(logits), targets).item()
            argmax[name] = torch.cat([x.argmax(-1) for x in logits])
    recorded = METRICS["validation_sample"]["val_loss"]
    for name in hf_models:
        assert nll[name] == pytest.approx(recorded[name], abs=2e-3)
        assert math.exp(nll[name]) < uni / 5
    assert nll["target"] < nll["draft"]
    agreement = (argmax["target"] == argmax["draft"]).float().mean().item()
    assert agreement == pytest.approx(METRICS["greedy_agreement"], abs=0.05)


def test_unigram_baseline_matches_the_corpus():
    """The baseline in metrics.json: add-one smoothed training-split frequencies scored on validation."""
    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * METRICS["split"]["train_fraction"])
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_TARGET / "tokenizer.model"))
    train, val = torch.tensor(sp.encode(text[:cut])), torch.tensor(sp.encode(text[cut:]))
    assert (len(train), len(val)) == (METRICS["split"]["train_tokens"], METRICS["split"]["val_tokens"])
    counts = torch.bincount(train, minlength=sp.get_piece_size()).double() + 1
    nll = -(counts.log() - counts.sum().log())[val].mean().item()
    assert nll == pytest.approx(METRICS["unigram_val_loss"], rel=1e-9)
    assert METRICS["validation_sample"]["text"] == text[cut:][: len(METRICS["validation_sample"]["text"])]


def test_llm_without_model_serves_the_demo_target():
    start = time.time()
    llm = LLM()
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert time.time() - start < 30
    assert llm.engine.config.model == str(DEMO_TARGET) and llm.engine.model_name == "shakespeare-target"
    assert len(out.outputs[0].token_ids) == 16
    assert out.outputs[0].text == "\nI am a shame of a man's name, and"  # the README's greedy ROMEO text
