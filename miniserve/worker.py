"""A Worker runs one model in one role (`target` or `draft`): it owns the model, its paged KV pool and the
attention metadata it builds for every forward pass.

Both roles share the engine's block tables (same block size, same token positions), but each worker's pool is
shaped by its own model (layers, KV heads, head size) and its own KV dtype and scales. Every KV write of both
roles goes through `reshape_and_cache` inside the model's attention layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miniserve.config import EngineConfig
from miniserve.cuda_graphs import GraphRunner
from miniserve.kernels import resolve_kv_cache_dtype, select_attention_backend
from miniserve.kernels.metadata import AttentionMetadata
from miniserve.models.config import ModelConfig
from miniserve.models.llama import LayerKV
from miniserve.models.loader import load_model

DECODE_QUERIES_MAX_LEN = 16  # up to this many new tokens per sequence, Triton runs them as decode queries
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ForwardInput:
    """New tokens of one sequence for one forward pass."""

    token_ids: list[int]  # the tokens to feed, at positions start_pos .. start_pos + len - 1
    start_pos: int  # tokens already in this worker's cache for the sequence
    block_table: list[int]
    num_logits: int  # logits wanted for the last `num_logits` new tokens (0 = none)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but no CUDA/ROCm GPU is available")
    return device


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' takes the checkpoint's dtype on a GPU and float32 on the CPU (where half precision is slow)."""
    if name != "auto":
        return _DTYPES[name]
    return cfg.torch_dtype if device.type != "cpu" else torch.float32


class Worker:
    def __init__(self, config: EngineConfig, model_dir: str, role: str, kv_cache_dtype: str):
        self.role = role
        self.model_dir = model_dir
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.backend = select_attention_backend(self.device, config.attention_backend)
        self.kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype, self.device)
        self.block_size = config.block_size
        # speculative rounds may compute (never emit) up to k positions past the context length
        lookahead = config.num_speculative_tokens if config.speculative_model else 0
        self.max_positions = max(self.model_config.max_position_embeddings, config.max_model_len or 0) + lookahead
        self.model, scales = load_model(
            model_dir, self.model_config, self.dtype, self.device, self.backend, self.max_positions
        )
        self.layer_scales = scales  # layer -> {"k": float, "v": float} from the checkpoint
        self.kv: list[LayerKV] = []
        self.graphs: GraphRunner | None = None
        if self.device.type == "cuda" and self.backend == "triton" and not config.enforce_eager:
            self.graphs = GraphRunner(self, config.max_num_seqs)

    def bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One tensor for the whole pool, viewed per layer as [num_blocks, block_size, kv_heads, head_dim]."""
        cfg = self.model_config
        shape = (cfg.num_layers, 2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_pool = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv = []
        for i in range(cfg.num_layers):
            s = self.layer_scales.get(i, {})
            k_scale = torch.tensor([s.get("k", 1.0)], dtype=torch.float32, device=self.device)
            v_scale = torch.tensor([s.get("v", 1.0)], dtype=torch.float32, device=self.device)
            self.kv.append(LayerKV(self.kv_pool[i, 0], self.kv_pool[i, 1], k_scale, v_scale))

    def prepare(self, inputs: list[ForwardInput]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Pack the sequences' new tokens and build attention metadata and the logits row indices."""
        bs = self.block_size
        ids, pos, slots, starts, seq_lens, logit_rows = [], [], [], [0], [], []
        max_blocks = max(len(x.block_table) for x in inputs)
        tables = []
        for x in inputs:
            n = len(x.token_ids)
            base = len(ids)
            ids.extend(x.token_ids)
            for p in range(x.start_pos, x.start_pos + n):
                pos.append(p)
                slots.append(x.block_table[p // bs] * bs + p % bs)
            starts.append(starts[-1] + n)
            seq_lens.append(x.start_pos + n)
            tables.append(x.block_table + [0] * (max_blocks - len(x.block_table)))
            logit_rows.extend(range(base + n - x.num_logits, base + n))
        dev = self.device

        def tensor(data, dtype):
            return torch.tensor(data, dtype=dtype, device=dev)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(starts, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(tables, torch.int32),
            max_query_len=max(len(x.token_ids) for x in inputs),
            max_seq_len=max(seq_lens),
        )
        return (
            tensor(ids, torch.int64),
            tensor(pos, torch.int64),
            self._for_kernels(meta),
            tensor(logit_rows, torch.int64),
        )

    def _for_kernels(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Batches of a few new tokens per sequence (speculative verification: k+1) run on the Triton backend as
        one decode query per token, built once per forward for all layers. Each token then gets the arithmetic of
        a plain decode step, so greedy speculation reproduces plain decoding bit for bit; with GQA this reads no
        more KV than the extend kernel, which loads each KV tile once per query head."""
        if self.backend == "triton" and 1 < meta.max_query_len <= DECODE_QUERIES_MAX_LEN:
            return meta.as_decode_queries()
        return meta

    @torch.inference_mode()
    def forward(self, inputs: list[ForwardInput]) -> torch.Tensor:
        """Run the model over the packed new tokens; return fp32 logits [sum(num_logits), vocab]."""
        if self.graphs is not None and self.graphs.supports(len(inputs)) and _is_decode(inputs):
            dev = self.device
            width = max(len(x.block_table) for x in inputs)
            tables = [x.block_table + [0] * (width - len(x.block_table)) for x in inputs]
            return self.forward_uniform(
                torch.tensor([x.token_ids for x in inputs], dtype=torch.int64, device=dev),
                torch.tensor([x.start_pos for x in inputs], dtype=torch.int64, device=dev),
                torch.tensor(tables, dtype=torch.int32, device=dev),
                max(x.start_pos for x in inputs) + 1,
            )
        ids, pos, meta, rows = self.prepare(inputs)
        hidden = self.model(ids, pos, meta, self.kv)
        return self.model.logits(hidden[rows])

    @torch.inference_mode()
    def forward_uniform(
        self, token_ids: torch.Tensor, start_pos: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int
    ) -> torch.Tensor:
        """Every sequence brings the same number of new tokens, already on the device: `token_ids` [B, n] at
        positions start_pos[b] .. start_pos[b] + n - 1. Returns logits for every new token, [B * n, V].

        The metadata is derived on the device (no host round trip), so speculative decoding can chain draft
        steps without waiting for the GPU, and the pass can be replayed from a CUDA graph.
        """
        if self.graphs is not None and self.graphs.supports(token_ids.shape[0]):
            return self.graphs.run(token_ids, start_pos, block_tables)
        return self.run_uniform(token_ids, start_pos, block_tables, max_seq_len, None)

    def run_uniform(
        self,
        token_ids: torch.Tensor,
        start_pos: torch.Tensor,
        block_tables: torch.Tensor,
        max_seq_len: int,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """The eager uniform pass (also what graphs capture); rows where `valid` is False write no KV."""
        B, n = token_ids.shape
        bs = self.block_size
        positions = (start_pos.unsqueeze(1) + torch.arange(n, device=self.device)).reshape(-1)
        rows = torch.arange(B, device=self.device).repeat_interleave(n)
        slots = block_tables[rows, positions // bs].long() * bs + positions % bs
        if valid is not None:
            slots = torch.where(valid[rows], slots, -1)
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=self.device),
            seq_lens=(start_pos + n).to(torch.int32),
            block_tables=block_tables,
            max_query_len=n,
            max_seq_len=max_seq_len,
        )
        meta = self._for_kernels(meta)
        hidden = self.model(token_ids.reshape(-1), positions, meta, self.kv)
        return self.model.logits(hidden)


def _is_decode(inputs: list[ForwardInput]) -> bool:
    return all(len(x.token_ids) == 1 and x.num_logits == 1 for x in inputs)
