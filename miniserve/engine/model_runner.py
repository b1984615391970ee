"""A ModelRunner runs one model in one role (`target` or `draft`): it owns the model, its paged KV pool and the
attention metadata it builds for every forward pass.

Both roles share the engine's block tables (same block size, same token positions), but each worker's pool is
shaped by its own model (layers, KV heads, head size) and its own KV dtype and scales. Every KV write of both
roles goes through `reshape_and_cache` inside the model's attention layers.

With tensor parallelism a ModelRunner holds one rank's shard of the model and of the KV pool (its KV heads, same
blocks and scales); rank 0's target is a `ParallelModelRunner` (miniserve/distributed/runner.py) that has the
other ranks run each call alongside it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from miniserve.config import (
    MAX_SPECULATIVE_TOKENS,
    EngineConfig,
    SettingError,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from miniserve.engine.cuda_graphs import BucketedGraphs, block_tables
from miniserve.engine.transfer import to_device
from miniserve.kernels.backend import is_rocm, resolve_backend
from miniserve.kernels.dependent_launch import DEPENDENT_MAX_TOKENS, dependent_launch_supported
from miniserve.kernels.fp8 import is_fp8
from miniserve.kernels.metadata import AttentionMetadata, uniform_metadata_reference
from miniserve.models.config import ModelConfig
from miniserve.models.llama import LayerKV
from miniserve.models.loader import load_model
from miniserve.models.parallel import TensorParallel

# up to this many new tokens a sequence, Triton runs them as decode queries: every speculative verification
DECODE_QUERIES_MAX_LEN = MAX_SPECULATIVE_TOKENS + 1
# one-sequence prompt passes up to 512 tokens are replayed from graphs, padded up to one of these lengths: eager, a
# short prompt costs milliseconds of kernel launches (tens of µs each), more than the GPU work
PREFILL_BUCKETS = (32, 64, 128, 256, 512)


@dataclass
class ForwardInput:
    """New tokens of one sequence for one forward pass."""

    token_ids: list[int]  # the tokens to feed, at positions start_pos .. start_pos + len - 1
    start_pos: int  # tokens already in this worker's cache for the sequence
    block_table: list[int] | np.ndarray  # (a decode step's: Sequence.block_array's view)
    num_logits: int  # logits wanted for the last `num_logits` new tokens (0 = none)


def cache_scales(checkpoint: dict[int, dict[str, float]], kv_dtype: torch.dtype) -> dict[int, dict[str, float]]:
    """The checkpoint's per-layer KV scales for this cache. They are calibrated for e4m3fn (amax / 448); an e4m3fnuz
    code reads half the value of the same e4m3fn bits (max 240), so its scales are doubled, as vLLM and SGLang
    double them: amax lands at 224, not clipped at 240."""
    if kv_dtype != torch.float8_e4m3fnuz:
        return checkpoint
    return {layer: {name: 2 * value for name, value in s.items()} for layer, s in checkpoint.items()}


class ModelRunner:
    graph_peer = None  # see ParallelModelRunner: other ranks that must replay a caller's graphs with this one

    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        role: str,
        kv_cache_dtype: str,
        tp: TensorParallel | None = None,
        device: torch.device | None = None,
    ):
        """`tp`: this rank's place in a tensor-parallel group (None: the whole model); `device`: the rank's own
        device (default: config.device)."""
        self.role = role
        self.model_dir = model_dir
        self.device = device or resolve_device(config.device)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.backend = resolve_backend(self.device, config.attention_backend)
        self.kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype, self.device)
        self.block_size = config.block_size
        # speculative rounds may compute (never emit) positions past the context length
        limit = max(self.model_config.max_context, config.max_model_len or 0)
        self.max_positions = limit + config.kv_lookahead
        self.model, scales = load_model(
            model_dir, self.model_config, self.dtype, self.device, self.backend, self.max_positions, tp
        )
        set_fp8_decode(self.model, config.fp8_decode, self.kv_dtype, self.device, self.role)
        for layer in self.model.layers:
            layer.self_attn.decode_splits = config.decode_splits
        set_dependent_launch(self.model, config.dependent_launch, self.backend, self.device)
        self.num_kv_heads = self.model.shard.num_kv_heads  # this rank's (all of them without tp)
        self.layer_scales = cache_scales(scales, self.kv_dtype)  # layer -> {"k": float, "v": float}
        self.kv: list[LayerKV] = []
        self.max_num_seqs = config.max_num_seqs
        self.use_graphs = self.device.type == "cuda" and self.backend == "triton" and not config.enforce_eager
        self.graphs: dict[int, BucketedGraphs] = {}  # new tokens per sequence -> captured uniform passes
        self.prefill_graphs: dict[int, BucketedGraphs] = {}  # padded length -> captured one-sequence prompt pass

    def cache_identity(self) -> tuple:
        """What makes this worker's K/V bytes for given tokens differ from another's: the prefix cache keys
        blocks by it as well as by their tokens."""
        scales = sorted((layer, tuple(sorted(s.items()))) for layer, s in self.layer_scales.items())
        return (self.role, self.model_dir, str(self.dtype), str(self.kv_dtype), self.block_size, scales)

    def bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * cfg.num_layers * self.block_size * self.num_kv_heads * cfg.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One tensor for the whole pool, viewed per layer as [num_blocks, block_size, kv_heads, head_dim]."""
        cfg = self.model_config
        shape = (cfg.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim)
        self.kv_pool = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv = []
        for i in range(cfg.num_layers):
            s = self.layer_scales.get(i, {})
            k_scale = torch.tensor([s.get("k", 1.0)], dtype=torch.float32, device=self.device)
            v_scale = torch.tensor([s.get("v", 1.0)], dtype=torch.float32, device=self.device)
            self.kv.append(LayerKV(self.kv_pool[i, 0], self.kv_pool[i, 1], k_scale, v_scale))

    def prepare(self, inputs: list[ForwardInput]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Pack the sequences' new tokens and build attention metadata and the logits row indices. Positions and
        cache slots are computed for all tokens at once (numpy): a prompt chunk brings thousands of tokens, and a
        Python loop over them held the GPU back for milliseconds a step before the pass could be launched."""
        bs = self.block_size
        counts = np.fromiter((len(x.token_ids) for x in inputs), np.int64, len(inputs))
        first = np.fromiter((x.start_pos for x in inputs), np.int64, len(inputs))
        ends = np.cumsum(counts)
        max_blocks = max(len(x.block_table) for x in inputs)
        tables = np.zeros((len(inputs), max_blocks), np.int64)
        for i, x in enumerate(inputs):
            tables[i, : len(x.block_table)] = x.block_table
        row = np.repeat(np.arange(len(inputs)), counts)  # the sequence of each packed token
        pos = np.arange(int(ends[-1])) + (first - (ends - counts))[row]
        slots = tables[row, pos // bs] * bs + pos % bs
        ids = list(itertools.chain.from_iterable(x.token_ids for x in inputs))
        logit_rows = [r for x, end in zip(inputs, ends.tolist()) for r in range(end - x.num_logits, end)]
        dev = self.device

        def tensor(data, dtype):
            return to_device(data, dtype, dev)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(np.concatenate(([0], ends)), torch.int32),
            seq_lens=tensor(first + counts, torch.int32),
            block_tables=tensor(tables, torch.int32),
            max_query_len=int(counts.max()),
            max_seq_len=int((first + counts).max()),
        )
        return (
            tensor(ids, torch.int64),
            tensor(pos, torch.int64),
            self._for_kernels(meta),
            tensor(logit_rows, torch.int64),
        )

    def _for_kernels(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Batches of a few new tokens per sequence (speculative verification: k+1) run on the Triton backend as
        one decode query per token, built once per forward for all layers: each token then gets a plain decode
        step's arithmetic, so greedy speculation reproduces plain decoding bit for bit (with GQA this reads no more
        KV than the extend kernel). So does a step whose prompt chunks are all that short. A mixed step with a
        longer prompt chunk beside decodes runs whole on the extend kernel: splitting its decodes off to the decode
        kernel made one API server stream 256 requests at once at 0.47x offline on the H200 (cause not found;
        `git log -p benchmarks/results/serve_h200.json`, commit 1e31adf)."""
        if self.backend == "triton" and 1 < meta.max_query_len <= DECODE_QUERIES_MAX_LEN:
            return meta.as_decode_queries()
        return meta

    @torch.inference_mode()
    def forward(
        self, inputs: list[ForwardInput], device_tokens: torch.Tensor | None = None, float_logits: bool = True
    ) -> torch.Tensor:
        """Run the model over the packed new tokens; return logits [sum(num_logits), vocab], fp32 or, with
        float_logits=False, in the model dtype (the sampler converts them only when it needs to: an argmax does
        not; at a 128k vocabulary the conversion is ~1.5% of a Llama-3.2-1B decode step at batch 64).

        `device_tokens` (int64 [B] on the device, one new token per sequence) replace the inputs' token ids: a
        decode step can then start from the previous step's samples before the host has read them."""
        graphs = self._graphs_for(inputs)
        if graphs is not None:  # graphs return the model dtype
            n = len(inputs[0].token_ids)
            columns = device_tokens[:, None] if device_tokens is not None else None
            logits = graphs.run([([*x.token_ids, x.start_pos, 1], x.block_table) for x in inputs], columns)[0]
            logits = logits if inputs[0].num_logits == n else logits.view(len(inputs), n, -1)[:, -1]
            return logits.float() if float_logits else logits
        if device_tokens is not None:  # one token per sequence, in order: the packed ids are these
            _, pos, meta, rows = self.prepare(inputs)
            hidden = self.model(device_tokens, pos, meta, self.kv)
            return self.model.logits(hidden[rows], float_logits)
        n = self.prefill_length(inputs)
        if n is not None:  # one sequence's prompt tokens, padded to a captured length
            x = inputs[0]
            tokens = x.token_ids + [0] * (n - len(x.token_ids))
            logits = self.prefill_graphs[n].run([([*tokens, x.start_pos, len(x.token_ids)], x.block_table)])[0]
            return logits[: x.num_logits].float() if float_logits else logits[: x.num_logits]
        ids, pos, meta, rows = self.prepare(inputs)
        hidden = self.model(ids, pos, meta, self.kv)
        return self.model.logits(hidden[rows], float_logits)

    def capture_graphs(self, tokens_per_seq: list[int]) -> None:
        """Capture the uniform passes of `n` new tokens per sequence for every batch bucket (decode steps: n = 1;
        with a draft, the target's verification n = k + 1 and the draft's catch-up n = 2)."""
        if self.use_graphs:
            for n in tokens_per_seq:
                if n not in self.graphs:
                    self.graphs[n] = self._capture_packed(n, self._uniform_graph_fn(n), self.max_num_seqs)

    def on_fatal_error(self, callback) -> None:
        """Nothing can fail behind a single-process runner's back (see ParallelModelRunner)."""

    def shutdown(self) -> None:
        """Nothing to stop for a single-process runner (see ParallelModelRunner)."""

    def capture_prefill_graphs(self) -> None:
        """Capture the one-sequence prompt passes (the common case at low load), one per PREFILL_BUCKETS length."""
        if self.use_graphs:
            for n in PREFILL_BUCKETS:
                if n <= self.max_positions and n not in self.prefill_graphs:
                    self.prefill_graphs[n] = self._capture_packed(n, self._prefill_graph_fn(n), 1)

    def disable_graphs(self) -> None:
        """Run every pass eager from now on (a capture failed)."""
        self.graphs, self.prefill_graphs = {}, {}
        self.use_graphs = False

    def _capture_packed(self, n: int, fn, max_batch: int) -> BucketedGraphs:
        """Graphs of `fn` over rows [n tokens, start_pos, valid or count, block table...]; the padding row has no
        valid token, so it writes no KV."""
        width = -(-self.max_positions // self.block_size)
        graphs = BucketedGraphs(fn, n + 2 + width, [0] * n + [0, 0], max_batch, self.device)
        graphs.capture_all()
        return graphs

    def _prefill_graph_fn(self, n: int):
        def run(packed: torch.Tensor) -> tuple[torch.Tensor]:
            """Packed row: [n tokens (the first `count` real), start_pos, count, block table...]; the logits of
            the last real token (model dtype)."""
            token_ids, start_pos, count = packed[:, :n], packed[:, n], packed[:, n + 1]
            tables = block_tables(packed, n + 2)
            positions, meta = uniform_metadata_reference(
                start_pos, None, tables, n, self.block_size, self.max_positions, counts=count
            )
            hidden = self.model(token_ids.reshape(-1), positions, self._for_kernels(meta), self.kv)
            last = torch.arange(packed.shape[0], device=packed.device) * n + (count - 1).clamp_min(0)
            return (self.model.logits(hidden[last], as_float=False),)

        return run

    def prefill_length(self, inputs: list[ForwardInput]) -> int | None:
        """The captured prompt-pass length for one sequence wanting at most its last token's logits; None when
        there is none (more sequences, longer chunks, prompt logprobs, or padding that would pass max_positions)."""
        if len(inputs) != 1 or inputs[0].num_logits > 1:
            return None
        x = inputs[0]
        n = next((b for b in PREFILL_BUCKETS if b >= len(x.token_ids)), None)
        if n is None or n not in self.prefill_graphs or x.start_pos + n > self.max_positions:
            return None
        return n

    def _uniform_graph_fn(self, n: int):
        def run(packed: torch.Tensor) -> tuple[torch.Tensor]:
            """Packed rows: [n tokens, start_pos, valid, block table...]; logits of every new token (model
            dtype)."""
            token_ids, start_pos, valid = packed[:, :n], packed[:, n], packed[:, n + 1].bool()
            tables = block_tables(packed, n + 2)
            # this runner's own pass (a ParallelModelRunner's run_uniform would also drive the other ranks, which
            # capture and replay these graphs themselves)
            return (ModelRunner.run_uniform(self, token_ids, start_pos, tables, self.max_positions, valid, False),)

        return run

    def _graphs_for(self, inputs: list[ForwardInput]) -> BucketedGraphs | None:
        """The captured pass for a batch whose sequences all bring the same n tokens and want the logits of the
        last one or of all of them; None when there is none."""
        n, want = len(inputs[0].token_ids), inputs[0].num_logits
        graphs = self.graphs.get(n)
        if graphs is None or not graphs.supports(len(inputs)) or want not in (1, n):
            return None
        if any(len(x.token_ids) != n or x.num_logits != want for x in inputs):
            return None
        return graphs

    def run_uniform(
        self,
        token_ids: torch.Tensor,
        start_pos: torch.Tensor,
        block_tables: torch.Tensor,
        max_seq_len: int,
        valid: torch.Tensor | None,
        float_logits: bool = True,
    ) -> torch.Tensor:
        """The eager uniform pass (also what graphs capture); rows where `valid` is False write no KV.
        float_logits=False keeps the logits in the model dtype (enough for an argmax; one kernel less)."""
        n = token_ids.shape[1]
        if self.backend == "triton" and n <= DECODE_QUERIES_MAX_LEN:  # one launch for all the metadata
            from miniserve.kernels.uniform_metadata import uniform_metadata_triton

            positions, meta = uniform_metadata_triton(start_pos, valid, block_tables, n, self.block_size, max_seq_len)
        else:
            positions, meta = uniform_metadata_reference(
                start_pos, valid, block_tables, n, self.block_size, max_seq_len
            )
            meta = self._for_kernels(meta)
        hidden = self.model(token_ids.reshape(-1), positions, meta, self.kv)
        return self.model.logits(hidden, float_logits)


def set_dependent_launch(model: torch.nn.Module, mode: str, backend: str, device: torch.device) -> None:
    """EngineConfig.dependent_launch: the model launches a pass's layer kernels as programmatic dependents in passes of
    up to DEPENDENT_MAX_TOKENS tokens where the GPU can (kernels/dependent_launch.py); elsewhere "auto" changes
    nothing."""
    enabled = mode == "auto" and backend == "triton" and dependent_launch_supported(device)
    model.dependent_tokens = DEPENDENT_MAX_TOKENS if enabled else 0


def set_fp8_decode(model: torch.nn.Module, mode: str, kv_dtype: torch.dtype, device: torch.device, role: str) -> None:
    """EngineConfig.fp8_decode for a worker's attention, when its pool is FP8 (a bf16 draft keeps auto)."""
    if mode == "auto" or (not is_fp8(kv_dtype) and role == "draft"):
        return
    if kv_dtype != torch.float8_e4m3fn or device.type != "cuda" or is_rocm():
        raise SettingError(
            "fp8_decode",
            f"fp8_decode={mode!r} needs an NVIDIA GPU and kv_cache_dtype=fp8 (float8_e4m3fn); this {role} "
            f"runs a {str(kv_dtype).removeprefix('torch.')} cache on {device.type}",
        )
    for layer in model.layers:
        layer.self_attn.fp8_decode = mode
