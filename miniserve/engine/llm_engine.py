"""LLMEngine: the request lifecycle around the step loop.

`add_request` validates and queues; `step` asks the scheduler what to run, runs one forward pass of the target
worker (or one speculative round when a draft is configured), samples, appends tokens, checks stop conditions and
returns the requests that progressed. Everything a step produces is cumulative, so a caller can stream by diffing.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass

import torch

from miniserve.config import EngineConfig
from miniserve.engine.model_runner import ForwardInput, ModelRunner
from miniserve.engine.outputs import CompletionOutput, RequestOutput
from miniserve.engine.sampler import SamplingBatch, SamplingParams, sample
from miniserve.engine.sequence import Sequence
from miniserve.engine.transfer import to_device
from miniserve.scheduler.block_manager import BlockManager
from miniserve.scheduler.scheduler import ScheduledSeq, Scheduler
from miniserve.tokenizer import IncrementalDetokenizer, Tokenizer

_CPU_KV_BUDGET_BYTES = 1 << 30


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        torch.manual_seed(config.seed)  # unseeded requests draw from the global RNG: make a run repeatable
        self.tokenizer = Tokenizer.from_pretrained(config.tokenizer or config.model)
        self.target = ModelRunner(config, config.model, "target", config.kv_cache_dtype)
        self.draft: ModelRunner | None = None
        if config.speculative_model:
            draft_kv = config.speculative_kv_cache_dtype or config.kv_cache_dtype
            self.draft = ModelRunner(config, config.speculative_model, "draft", draft_kv)
            if self.draft.model_config.vocab_size != self.target.model_config.vocab_size:
                raise ValueError(
                    f"speculative_model {config.speculative_model} has vocab_size "
                    f"{self.draft.model_config.vocab_size}, the target has {self.target.model_config.vocab_size}"
                )
        self.device = self.target.device
        self.max_model_len = self._max_model_len()
        self.model_name = config.served_model_name or config.model.rstrip("/").split("/")[-1]
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.target.model_config.eos_token_ids)
        self.vocab_size = self.target.model_config.vocab_size
        lookahead = config.kv_lookahead
        num_blocks = self._num_kv_blocks(lookahead)
        for worker in self.workers:
            worker.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, lookahead)
        self.requests: dict[str, Request] = {}
        self.seq_counter = itertools.count()
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0}
        self.spec = None
        if self.draft is not None:
            from miniserve.spec_decode.decoder import SpeculativeDecoder

            self.spec = SpeculativeDecoder(self)
        self._capture_graphs()

    def _capture_graphs(self) -> None:
        """The passes replayed from CUDA graphs: decode steps, one-sequence prompt passes up to 512 tokens; with a
        draft, also the target's verification and the draft's two-token catch-up (sampled rounds) and the whole
        greedy round."""
        k = self.config.num_speculative_tokens
        try:
            self.target.capture_graphs([1, k + 1] if self.draft else [1])
            if self.draft is not None:
                self.draft.capture_graphs([1, 2])
            for worker in self.workers:
                worker.capture_prefill_graphs()
            if self.spec is not None and self.spec.graphs is not None:
                self.spec.graphs.capture_all()
        except RuntimeError as e:  # a capture failure must not take the engine down: run eager instead
            warnings.warn(f"CUDA graph capture failed, running eager (enforce_eager=True): {e}", stacklevel=2)
            for worker in self.workers:
                worker.graphs, worker.prefill_graphs = {}, {}
                worker.use_graphs = False
            if self.spec is not None:
                self.spec.graphs = None

    @property
    def workers(self) -> list[ModelRunner]:
        return [self.target] + ([self.draft] if self.draft else [])

    def _max_model_len(self) -> int:
        cfg = self.target.model_config
        limit = cfg.max_position_embeddings
        if self.draft is not None:
            limit = min(limit, self.draft.model_config.max_position_embeddings)
        wanted = self.config.max_model_len or limit
        if wanted > limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's max_position_embeddings={limit}")
        if cfg.sliding_window is not None and wanted > cfg.sliding_window:
            # full attention equals sliding-window attention up to the window; beyond it the two differ
            warnings.warn(
                f"{self.config.model} uses sliding-window attention ({cfg.sliding_window} tokens), which miniserve "
                f"does not implement: max_model_len is capped at {cfg.sliding_window}",
                stacklevel=2,
            )
            wanted = cfg.sliding_window
        return wanted

    def _num_kv_blocks(self, lookahead: int) -> int:
        """Size the shared pool: explicit count, else the memory budget, capped at what max_num_seqs can use."""
        per_block = sum(w.bytes_per_block() for w in self.workers)
        cap = self.config.max_num_seqs * (-(-(self.max_model_len + lookahead) // self.config.block_size)) + 1
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_gb is not None:
            budget = int(self.config.kv_cache_memory_gb * (1 << 30))
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1 - self.config.gpu_memory_utilization))
        else:
            budget = _CPU_KV_BUDGET_BYTES
        num_blocks = min(budget // per_block, cap)
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache (budget {budget} bytes, {per_block} bytes per block)")
        return num_blocks

    # ---------------------------------------------------------------- requests

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})")
        self._check_length(ids, params)
        seqs, dets = [], []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seq = Sequence(next(self.seq_counter), request_id, i, ids, params, gen)
            seqs.append(seq)
            dets.append(IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt_ids=ids))
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, dets)
        for seq in seqs:
            self.scheduler.add(seq, parent=seqs[0] if seq.index > 0 else None)
        self.counters["prompt_tokens_total"] += len(ids)

    def _check_length(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but the model's context length (max_model_len) is "
                f"{self.max_model_len}, which leaves no room to generate"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the model's context length max_model_len={self.max_model_len}"
            )
        need = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if self.block_manager.blocks_for(need + self.scheduler.lookahead) > self.block_manager.num_blocks:
            raise ValueError(
                f"this request may need {need} tokens of KV cache but the whole pool holds "
                f"{self.block_manager.num_blocks * self.block_manager.block_size}; it can never fit"
            )

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------- the step

    def step(self) -> list[RequestOutput]:
        drained = []
        if self.spec is not None and self.spec.in_flight is not None and not self.spec.can_continue():
            drained = self.spec.drain()  # the batch changes: emit the round in flight before rescheduling
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return self._collect_outputs(drained)
        if self.spec is not None:
            progressed = self.spec.step(scheduled)
        else:
            progressed = self._plain_step(scheduled)
        return self._collect_outputs(drained + progressed)

    def _plain_step(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        inputs = [self.forward_input(s) for s in scheduled]
        ready = [s.seq for s in scheduled if s.completes_prompt]
        logits = self.target.forward(inputs)
        sample_rows, row = [], 0
        for s, x in zip(scheduled, inputs):
            if s.seq.scores_prompt:
                self._record_prompt_logprobs(s.seq, logits[row : row + x.num_logits], x.start_pos)
            if s.completes_prompt:
                sample_rows.append(row + x.num_logits - 1)
            row += x.num_logits
            s.seq.num_computed_tokens += s.num_new_tokens
        if ready:
            if row != len(sample_rows):  # prompt-scoring rows are mixed in: keep the last row of each ready seq
                logits = logits[to_device(sample_rows, torch.int64, logits.device)]
            out = sample(logits, self.sampling_batch(ready))
            self.append_tokens(ready, out)
        return [s.seq for s in scheduled]

    @staticmethod
    def forward_input(s: ScheduledSeq) -> ForwardInput:
        """The sequence's new tokens; logits for its last one when it completes, for all when scoring a prompt."""
        seq, start = s.seq, s.seq.num_computed_tokens
        tokens = seq.token_ids[start : start + s.num_new_tokens]
        num_logits = len(tokens) if seq.scores_prompt else (1 if s.completes_prompt else 0)
        return ForwardInput(tokens, start, seq.block_table, num_logits)

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, start_pos: int) -> None:
        """Row j (position start_pos + j) predicts prompt token start_pos + j + 1; positions scored before a
        preemption are not scored twice."""
        first = len(seq.prompt_logprobs) - start_pos - 1  # the first row not scored yet
        last = min(logits.shape[0], seq.num_prompt_tokens - start_pos - 1)
        if first < 0 or first >= last:  # (first < 0 cannot happen: choice 0 always computes its prompt)
            return
        logprobs = torch.log_softmax(logits[first:last].float(), dim=-1)
        targets = seq.prompt_token_ids[start_pos + first + 1 : start_pos + last + 1]
        chosen = logprobs.gather(1, to_device(targets, torch.int64, logits.device)[:, None]).squeeze(1).tolist()
        n = seq.params.prompt_logprobs
        tops = logprobs.topk(n, dim=-1) if n else None
        top_ids, top_vals = (tops.indices.tolist(), tops.values.tolist()) if tops is not None else ([], [])
        for j, (token, lp) in enumerate(zip(targets, chosen)):
            entry = dict(zip(top_ids[j], top_vals[j])) if n else {}
            entry[token] = lp
            seq.prompt_logprobs.append(entry)

    def sampling_batch(self, seqs: list[Sequence], histories: list[list[int]] | None = None) -> SamplingBatch:
        """One sampling row per sequence (or per given output history, for speculative verification).

        A history is copied out of the sequence only when the sampler reads it: copying every sequence's
        output every step would cost O(length) per token."""
        if histories is None:
            histories = [s.output_token_ids if s.params.needs_history else [] for s in seqs]
        return SamplingBatch.build(
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.prompt_token_ids for s in seqs],
            histories,
            self.eos_token_ids,
            self.vocab_size,
            self.device,
        )

    def append_tokens(self, seqs: list[Sequence], out) -> None:
        """Append one sampled token per sequence, with its logprobs, and apply the stop rules."""
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        tops = None
        if out.top_logprobs is not None:
            tops = (out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist())
        for row, (seq, token) in enumerate(zip(seqs, token_ids)):
            lp = logprobs[row] if logprobs is not None else None
            top = None
            if seq.params.logprobs is not None and tops is not None:
                n = seq.params.logprobs
                top = dict(zip(tops[0][row][:n], tops[1][row][:n]))
            self.append_token(seq, token, lp, top)

    def append_token(self, seq: Sequence, token: int, logprob: float | None, top: dict[int, float] | None) -> None:
        if seq.is_finished:
            return
        seq.token_ids.append(token)
        self.counters["generation_tokens_total"] += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if seq.logprobs is not None:
            entry = dict(top or {})
            entry[token] = logprob
            seq.logprobs.append(entry)
        if logprob is not None:
            seq.cumulative_logprob += logprob
        req = self.requests[seq.request_id]
        detok = req.detokenizers[seq.index]
        delta = detok.add([token])
        seq.text += delta
        self._check_stop(seq, token, len(delta))
        if seq.is_finished and not isinstance(seq.stop_reason, str):
            seq.text += detok.flush()  # release text held back for an incomplete UTF-8 sequence

    def _check_stop(self, seq: Sequence, token: int, delta_len: int) -> None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return self._finish(seq, "stop", None)
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._finish(seq, "stop", token)
            if p.stop:
                for stop in p.stop:
                    start = max(0, len(seq.text) - delta_len - len(stop) + 1)
                    idx = seq.text.find(stop, start)
                    if idx != -1:
                        seq.text = seq.text[: idx + (len(stop) if p.include_stop_str_in_output else 0)]
                        return self._finish(seq, "stop", stop)
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return self._finish(seq, "length", None)
        if seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", None)
        return None

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    # ---------------------------------------------------------------- outputs

    def _collect_outputs(self, progressed: list[Sequence]) -> list[RequestOutput]:
        outputs = []
        seen = set()
        for seq in progressed:
            if seq.request_id in seen or seq.request_id not in self.requests:
                continue
            seen.add(seq.request_id)
            req = self.requests[seq.request_id]
            out = self._request_output(req)
            outputs.append(out)
            if out.finished:
                del self.requests[req.request_id]
        return outputs

    def _request_output(self, req: Request) -> RequestOutput:
        completions = []
        hold = max((len(s) for s in req.params.stop), default=1) - 1 if req.params.stop else 0
        for seq in req.seqs:
            text = seq.text if seq.is_finished or hold == 0 else seq.text[: max(0, len(seq.text) - hold)]
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=seq.output_token_ids,  # a fresh slice: a snapshot
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    cumulative_logprob=seq.cumulative_logprob if req.params.logprobs is not None else None,
                )
            )
        first = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
        metrics = {
            "arrival_time": min(s.arrival_time for s in req.seqs),
            "first_token_time": min(first) if first else None,
            "num_spec_drafts": sum(s.num_spec_drafts for s in req.seqs),
            "num_spec_draft_tokens": sum(s.num_spec_draft_tokens for s in req.seqs),
            "num_spec_accepted_tokens": sum(s.num_spec_accepted_tokens for s in req.seqs),
        }
        finished = all(s.is_finished for s in req.seqs)
        prompt_logprobs = req.seqs[0].prompt_logprobs
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            completions,
            finished,
            metrics,
            list(prompt_logprobs) if prompt_logprobs is not None else None,
        )

    def stats(self) -> dict:
        s = {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": self.block_manager.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.counters,
            "spec_num_drafts": 0,
            "spec_num_draft_tokens": 0,
            "spec_num_accepted_tokens": 0,
            "spec_accepted_per_position": [],
        }
        if self.spec is not None:
            s.update(self.spec.stats())
        return s
