"""All engine settings in one dataclass, shared by the offline `LLM`, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo_models"
DEMO_TARGET = DEMO_DIR / "shakespeare-target"
DEMO_DRAFT = DEMO_DIR / "shakespeare-draft"

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e4m3fnuz", "bfloat16", "float16", "float32")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("auto", "triton", "torch")


@dataclass
class EngineConfig:
    model: str | None = None  # a Hugging Face model directory; None = the embedded demo target
    tokenizer: str | None = None  # defaults to the model directory
    served_model_name: str | None = None  # the name clients use; defaults to the model directory's name
    dtype: str = "auto"  # weights and activations; "auto" = config.json's torch_dtype (float32 on CPU if bf16)
    kv_cache_dtype: str = "auto"  # "auto" = model dtype; "fp8"/"fp8_e4m3" = e4m3fn (e4m3fnuz on gfx94x)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    attention_backend: str = "auto"  # "auto" = triton on cuda/rocm, torch reference on cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # override the KV pool size (blocks per worker)
    kv_cache_memory_gb: float | None = None  # KV pool budget; default: 90% of free GPU memory, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256  # as vLLM; the KV pool caps what runs at once
    max_num_batched_tokens: int = 8192  # new tokens per step: prompt chunks up to this size
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_stop_strings: int = 32  # stop strings per request (OpenAI allows 4); a longer list is refused
    max_stop_string_length: int = 256  # characters per stop string
    seed: int = 0  # seeds the global RNG that requests without their own `seed` sample from
    speculative_model: str | None = None  # a draft model directory (same tokenizer); "demo" = the demo draft
    num_speculative_tokens: int = 4
    speculative_kv_cache_dtype: str | None = None  # draft pool dtype; None = same as kv_cache_dtype
    # reuse the KV blocks of prompt prefixes computed before (scheduler/block_manager.py); off: every prompt is
    # computed from scratch
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs (on a GPU, uniform decode passes are replayed from graphs)
    # greedy speculative rounds: launch round N+1 from round N's device outputs before the host reads round N, so
    # the host's output processing overlaps the GPU's next round (see spec_decode.py)
    overlap_spec_rounds: bool = True
    # plain decoding: launch decode step N+1 from step N's samples on the device, and read step N (tokens, stops,
    # outputs) while the GPU runs N+1 (see engine/decoder.py)
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = str(DEMO_TARGET)
        if self.speculative_model == "demo":
            self.speculative_model = str(DEMO_DRAFT)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.speculative_kv_cache_dtype is not None:
            _check_choice("speculative_kv_cache_dtype", self.speculative_kv_cache_dtype, KV_CACHE_DTYPES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_stop_strings", "max_stop_string_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @property
    def kv_lookahead(self) -> int:
        """KV slots past a sequence's length that a decode step may write: none without a draft; k for a
        speculative round; 2k+1 when the next round is launched before this one's result is known (it starts up
        to k+1 tokens further and writes k more)."""
        if not self.speculative_model:
            return 0
        k = self.num_speculative_tokens
        return 2 * k + 1 if self.overlap_spec_rounds else k


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
