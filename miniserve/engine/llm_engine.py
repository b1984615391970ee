"""LLMEngine: the request lifecycle around the step loop.

`add_request` validates a request and queues its sequences; `step` goes on with a decode step in flight that
nothing changes (no scheduler), else asks the scheduler what to run and lets the decoder run it (the target's
prompt and decode passes, or one speculative round when a draft is configured), and returns the output of every
request that reports (cumulative, delta or final only: SamplingParams.output_kind). Everything else lives
one layer down: the decoders (decoder.py, spec_decode/), token appending and stop rules (output_processor.py),
the models and their KV pools (model_runner.py), what runs when (scheduler/).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Iterable

import torch

from miniserve.config import EngineConfig, resolve_chat_template
from miniserve.detokenizer import IncrementalDetokenizer
from miniserve.engine import capacity
from miniserve.engine.decoder import Decoder, PlainDecoder
from miniserve.engine.launch_hold import MAX_BATCH, LaunchHold
from miniserve.engine.model_runner import ModelRunner
from miniserve.engine.output_processor import OutputProcessor, Request
from miniserve.engine.outputs import RequestOutput
from miniserve.engine.prompts import Prompt, read_prompt
from miniserve.engine.sampler import bad_words_token_ids, check_allowed_tokens, check_bad_words
from miniserve.engine.stop_strings import StopMatcher, check_stop_strings
from miniserve.engine.structured_output import GrammarCompiler
from miniserve.models.generation_config import eos_token_ids, generation_config_dir, sampling_defaults
from miniserve.sampling_params import SamplingParams, truncation_length
from miniserve.scheduler.block_manager import BlockManager
from miniserve.scheduler.scheduler import Scheduler
from miniserve.scheduler.sequence import Sequence
from miniserve.spec_decode.decoder import SpeculativeDecoder
from miniserve.tokenizer import Tokenizer

logger = logging.getLogger("miniserve.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        config.check_dirs()
        # unseeded requests draw from the global RNG: a seed makes a run repeatable, None draws one from the OS
        if config.seed is None:
            torch.seed()
        else:
            torch.manual_seed(config.seed)
        self.tokenizer = Tokenizer.from_pretrained(
            config.tokenizer or config.model,
            resolve_chat_template(config.chat_template),
            config.chat_template_content_format,
        )
        self.target = _target_runner(config)
        try:
            self._init_rest(config)
        except BaseException:
            self.target.shutdown()  # no tensor-parallel rank outlives a failed start
            raise

    def _init_rest(self, config: EngineConfig) -> None:
        self.draft = _load_draft(config, self.target)
        self.device = self.target.device
        self.max_model_len = capacity.max_model_len(config, self.workers)
        self.model_name = config.model.rstrip("/").split("/")[-1]
        self.sampling_defaults = _sampling_defaults(config)
        self.vocab_size = self.target.model_config.vocab_size
        num_blocks = capacity.num_kv_blocks(config, self.workers, self.max_model_len)
        for worker in self.workers:
            worker.allocate_kv_cache(num_blocks)
        identity = repr([w.cache_identity() for w in self.workers]).encode()  # roots every prefix-cache key
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, identity)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.kv_lookahead,
            has_draft=self.draft is not None,
            by_priority=config.scheduling_policy == "priority",
        )
        eos = set(self.tokenizer.eos_token_ids) | set(self.target.model_config.eos_token_ids)
        # with a separate tokenizer directory, or --generation-config DIR, the tokenizer has not read these
        eos |= eos_token_ids(config.model, config.generation_config)
        self.grammar = GrammarCompiler(self.tokenizer, self.vocab_size, eos)  # xgrammar loads on first use
        self.outputs = OutputProcessor(self.scheduler, eos, self.max_model_len, self.tokenizer)
        overlap = config.async_scheduling and self.draft is None  # speculative rounds overlap on their own
        plain = PlainDecoder(
            self.target, self.outputs, self.vocab_size, self.scheduler, overlap, config.grammar_threads
        )
        self.decoder: Decoder = plain
        if self.draft is not None:
            self.decoder = SpeculativeDecoder(
                config, self.target, self.draft, plain, self.outputs, self.scheduler, self.max_model_len
            )
        self.seq_counter = itertools.count()
        self.last_step_num_tokens = 0  # tokens the last step computed (the iteration_tokens histogram)
        self._capture_graphs()

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any (also done at exit). The engine is unusable afterwards."""
        self.target.shutdown()

    def on_fatal_error(self, callback) -> None:
        """Call `callback(error)`, from another thread, if the engine dies outside a step (a tensor-parallel rank
        exited); errors inside a step are raised by `step`."""
        self.target.on_fatal_error(callback)

    @property
    def workers(self) -> list[ModelRunner]:
        return [self.target] + ([self.draft] if self.draft else [])

    def _capture_graphs(self) -> None:
        """Capture the passes the decoder replays from CUDA graphs, when the engine starts (no request pays for a
        capture mid-stream). A capture failure must not take the engine down: it runs eager instead."""
        try:
            self.decoder.capture_graphs()
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture failed, running eager (enforce_eager=True): {e}", stacklevel=2)
            self.decoder.disable_graphs()

    # ---------------------------------------------------------------- requests

    def hold_launches(self, wait: Callable[[float], bool], max_batch: int = MAX_BATCH) -> None:
        """A served engine: launch each overlapped decode step of at most `max_batch` sequences only when it is
        due, waiting for requests until then with `wait(seconds)` (which applies what came and says whether
        anything did), so that a new prompt runs right after the step in flight, not after the next one too
        (engine/launch_hold.py). Plain decoding with overlap only."""
        if isinstance(self.decoder, PlainDecoder) and self.decoder.overlap:
            self.decoder.hold = LaunchHold(wait, max_batch)

    def default_sampling_params(self) -> SamplingParams:
        """What a request without sampling params gets: the model's generation_config.json settings (vLLM's
        generation_config="auto"), else SamplingParams()."""
        return SamplingParams(**self.sampling_defaults)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict | Prompt,
        params: SamplingParams | None = None,
        prompt_text: str | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a prompt: text, token ids (whose text, if known, is `prompt_text`: the output's `prompt`), or
        vLLM's prompt dicts (engine/prompts.py). Generation ends at max_tokens or where the context
        (max_model_len) is full, as in vLLM's offline engine (the server refuses a max_tokens that cannot fit, as
        vLLM's does). `priority` (lower first) orders the queue under scheduling_policy "priority"; it must be 0
        otherwise, as in vLLM."""
        prompt, params, prompt_text = read_prompt(prompt, params or self.default_sampling_params(), prompt_text)
        if request_id in self.outputs.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_priority(priority)
        keep = truncation_length(params.truncate_prompt_tokens, self.max_model_len)
        if isinstance(prompt, str) and keep is not None:
            text, ids = prompt, self.tokenizer.encode_last(prompt, keep)
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = prompt_text, list(prompt)
            wrong = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
            if wrong is not None:  # (int() would have made 1.5 a token 1)
                raise ValueError(f"prompt token ids must be integers, got {wrong!r}")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})")
        if keep is not None and len(ids) > keep:
            ids = ids[-keep:]  # token ids: their end, as vLLM keeps
        self.check_length(ids, params)
        self._check_params(params)
        seqs, dets = [], []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seq = Sequence(next(self.seq_counter), request_id, i, ids, params, gen, priority)
            if params.structured_outputs is not None:
                seq.grammar = self.grammar.new_state(params.structured_outputs)
            seqs.append(seq)
            dets.append(IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt_ids=ids))
        matcher = StopMatcher(params.stop) if params.stop else None
        self.outputs.add(Request(request_id, text, ids, params, seqs, dets, matcher))
        for seq in seqs:
            self.scheduler.add(seq, parent=seqs[0] if seq.index > 0 else None)

    def _check_priority(self, priority: object) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(
                f"priority: {priority} needs scheduling_policy 'priority' (--scheduling-policy priority); under "
                "'fcfs' every request's priority is 0"
            )

    def _check_params(self, params: SamplingParams) -> None:
        """What needs the engine to check: stop-list and bad-word bounds, token ids within the vocabulary, a token
        left to sample, the grammar (compiled here, or found compiled: errors before anything is queued); bad words
        are tokenized once."""
        check_stop_strings(params.stop, self.config.max_stop_strings, self.config.max_stop_string_length)
        check_bad_words(params.bad_words, self.config.max_bad_words)
        params.check_token_ids(self.vocab_size)
        params.check_logprobs(self.config.max_logprobs, self.vocab_size)
        if params.bad_words and params.bad_words_token_ids is None:  # (the server tokenizes them itself)
            params.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
        grammar_first = None
        if params.structured_outputs is not None:
            self.grammar.compile(params.structured_outputs)
            if params.allowed_token_ids or params.bad_words_token_ids:  # (a fill: only where masks may meet)
                grammar_first = self.grammar.first_tokens(params.structured_outputs)
        check_allowed_tokens(params, self.outputs.eos_token_ids, self.vocab_size, grammar_first)

    def check_length(self, ids: list[int], params: SamplingParams) -> None:
        """A ValueError for a request that can never run: an empty prompt, one the context or the pool cannot hold."""
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but the model's context length (max_model_len) is "
                f"{self.max_model_len}, which leaves no room to generate"
            )
        # the last token is sampled, never fed back: it needs no KV slot; a draft's lookahead slots come on top,
        # unless no speculative round follows: the prompt pass samples the only token the request may have, or the
        # request is not `speculative` (a grammar's)
        pool = self.block_manager.num_blocks * self.block_manager.block_size
        end = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        lookahead = self.scheduler.lookahead if end - len(ids) > 1 and params.speculative else 0
        need = end - 1 + lookahead
        if need > pool:
            draft = f", {lookahead} of them for the draft's proposals" if lookahead else ""
            what = f"this request may need {need} tokens of KV cache{draft}, but the whole pool holds {pool}"
            # the most new tokens n that fit (prompt + n - 1 + lookahead slots); one alone runs no round: no lookahead
            most = pool + 1 - len(ids) - (self.scheduler.lookahead if params.speculative else 0)
            most = most if most >= 2 else int(len(ids) <= pool)
            if most:  # fewer new tokens would fit: say how many
                raise ValueError(f"max_tokens: {what}; at most {most} new tokens fit beside this prompt")
            raise ValueError(f"{what}; it can never fit")

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Abort a request, or several (vLLM's list of ids)."""
        for one in [request_id] if isinstance(request_id, str) else request_id:
            self.outputs.abort(one)

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache (benchmarks that repeat the same prompts start each run from nothing)."""
        self.block_manager.reset_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    # ---------------------------------------------------------------- the step

    def step(self) -> list[RequestOutput]:
        """Schedule, run, and return the outputs of the requests that progressed."""
        return self.outputs.collect(self._advance())

    def step_messages(self) -> list[tuple]:
        """step() for the engine process: the outputs as compact tuples (OutputProcessor.collect_messages)."""
        return self.outputs.collect_messages(self._advance())

    def _advance(self) -> list[Sequence]:
        """Schedule and run one step; the sequences that progressed."""
        progressed = self.decoder.continue_in_flight()  # an overlapped decode step of the batch in flight
        if progressed is not None:
            self.last_step_num_tokens = self.decoder.last_computed
            return progressed
        progressed = self.decoder.flush()  # a step or round in flight the new batch cannot continue
        scheduled = self.scheduler.schedule()
        self.last_step_num_tokens = 0
        if scheduled:
            progressed += self.decoder.step(scheduled)
            self.last_step_num_tokens = self.decoder.last_computed  # prompt + decode tokens computed
        return progressed

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": self.block_manager.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.scheduler.prefix_cache_queries,
            "prefix_cache_hits": self.scheduler.prefix_cache_hits,
            "prompt_tokens_total": self.outputs.num_prompt_tokens,
            "generation_tokens_total": self.outputs.num_generation_tokens,
            "spec_num_drafts": 0,
            "spec_num_draft_tokens": 0,
            "spec_num_accepted_tokens": 0,
            "spec_accepted_per_position": [],
            **self.decoder.stats(),
        }


def _target_runner(config: EngineConfig) -> ModelRunner:
    """The target model: in this process, or split over `tensor_parallel_size` ranks with rank 0 here."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, config.model, "target", config.kv_cache_dtype)
    from miniserve.distributed.runner import ParallelModelRunner

    return ParallelModelRunner.launch(config)


def _load_draft(config: EngineConfig, target: ModelRunner) -> ModelRunner | None:
    """The draft model of speculative decoding, if one is configured; it must share the target's vocabulary."""
    if not config.speculative_model:
        return None
    draft_kv = config.speculative_kv_cache_dtype or config.kv_cache_dtype
    draft = ModelRunner(config, config.speculative_model, "draft", draft_kv)
    if draft.model_config.vocab_size != target.model_config.vocab_size:
        raise ValueError(
            f"speculative_model {config.speculative_model} has vocab_size "
            f"{draft.model_config.vocab_size}, the target has {target.model_config.vocab_size}"
        )
    return draft


def _sampling_defaults(config: EngineConfig) -> dict[str, float | int]:
    """The model's sampling defaults (models/generation_config.py), checked as SamplingParams checks a request's."""
    defaults = sampling_defaults(config.model, config.generation_config, config.generation_override())
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        where = generation_config_dir(config.model, config.generation_config)
        raise ValueError(f"{where}/generation_config.json: {exc}") from None
    if defaults:
        logger.info("sampling defaults (generation_config.json, override_generation_config): %s", defaults)
    return defaults
