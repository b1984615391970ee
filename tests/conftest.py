"""Shared fixtures: tiny random Hugging Face checkpoints (built with transformers, saved with save_pretrained)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The suite is the CPU suite on every machine: Triton kernels run in the interpreter and torch sees no GPU.
# GPU checks are the scripts under benchmarks/ (gpu_kernels.py, gpu_engine_check.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One torch thread per process (inherited by the server and CLI subprocesses): the suite's tensors are tiny, and
# on a shared or 2-core machine extra threads only contend (measured: 10 min instead of 39 under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "tinyshakespeare.txt"  # Tiny Shakespeare, committed with the repository
VOCAB = 384

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def corpus_text(num_chars: int = 200_000) -> str:
    return CORPUS.read_text(encoding="utf-8")[:num_chars]


def build_tokenizer_files(out: Path) -> None:
    """A byte-level BPE tokenizer.json trained on Shakespeare, with BOS/EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": template,
        "model_max_length": 256,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def hf_config(arch: str, **overrides):
    """A tiny config of the given architecture: GQA (4 query heads, 2 KV heads), 2 layers."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[arch]
    if arch == "Qwen3ForCausalLM":
        common.setdefault("head_dim", 16)
    return cls(**common)


def build_model_dir(
    out: Path,
    arch: str,
    tokenizer_dir: Path,
    seed: int = 0,
    dtype=torch.float32,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Random weights with a visible scale, saved as a Hugging Face directory with the shared tokenizer."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    model = getattr(transformers, arch)(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger weights than the default init: peaked logits
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


def fixture_dir(tmp_path_factory, name: str, build) -> Path:
    """A fresh directory built by `build(dir)`; with MINISERVE_TEST_CACHE set (scripts/mutation.py, which runs
    pytest once per mutant), built once there and reused by later sessions (the builds are deterministic)."""
    cache = os.environ.get("MINISERVE_TEST_CACHE")
    if not cache:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    out = Path(cache) / name
    if not (out / ".complete").exists():
        build(out)
        (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return fixture_dir(tmp_path_factory, "tokenizer", build_tokenizer_files)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The Llama checkpoint most tests use (built alone: tests that need only it skip the other three)."""
    return fixture_dir(tmp_path_factory, ARCHS[0], lambda out: build_model_dir(out, ARCHS[0], tokenizer_dir, seed=0))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir, llama_dir) -> dict[str, Path]:
    """One tiny checkpoint per supported architecture."""
    dirs = {ARCHS[0]: llama_dir}
    for i, arch in enumerate(ARCHS[1:], start=1):
        dirs[arch] = build_model_dir(tmp_path_factory.mktemp(arch), arch, tokenizer_dir, seed=i)
    return dirs


def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy decoding with its own KV cache and EOS ignored: the oracle for greedy output."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # else generate() masks BOS (id 0) as padding
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="session")
def draft_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A one-layer model sharing the test target's tokenizer: it agrees with the target only some of the time."""
    shape = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    shape["num_key_value_heads"] = 1
    return fixture_dir(
        tmp_path_factory, "draft", lambda out: build_model_dir(out, "LlamaForCausalLM", tokenizer_dir, seed=42, **shape)
    )


# ---------------------------------------------------------------------------------------------- server tests
# For test modules that define `url` (a running server) and `model_dir` (the model it serves).


@pytest.fixture(scope="module")
def client(url):
    """The official openai client on the module's server."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    """The served model in Hugging Face transformers: the oracle."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)
