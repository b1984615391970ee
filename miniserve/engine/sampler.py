"""The batched sampler (the per-request knobs are miniserve/sampling_params.py).

The sampler works on a [B, V] logits tensor on its own device, one row per logits row (a request may own
several rows, e.g. when the speculative verifier scores k+1 positions). Per step the engine builds one
`SamplingBatch` (the per-row parameters as tensors), then calls `sample`, or `probs` + `sample_from_probs`
for rejection sampling.

Random rows use the exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.
A seeded row draws its E (V values per step) from its own `torch.Generator`, so its tokens depend only
on its seed and its logits, never on which other requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from miniserve.engine.transfer import to_device
from miniserve.kernels.backend import triton_installed
from miniserve.kernels.sampling import covers, gumbel_argmax
from miniserve.sampling_params import SamplingParams

TokenIds = list[int] | np.ndarray  # a row's token history: a list, or Sequence.token_array's view (no copy)

# ---------------------------------------------------------------------------- the batch


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B]: log_softmax(raw logits, grammar-masked) at the sampled token
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # (ids int64 [B, N], values float32 [B, N])
    ranks: torch.Tensor | None = None  # int64 [B]: the sampled tokens' ranks (tokens at least as likely), with logprobs


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device; build once per step. A per-row tensor is
    None when no row needs it, so an all-greedy decode step copies nothing to the device."""

    vocab_size: int
    device: torch.device
    generators: list[torch.Generator | None]
    greedy: torch.Tensor | None  # bool [B]; None unless greedy and sampled rows are mixed
    any_greedy: bool  # Python flags, so the hot path needs no device sync
    all_greedy: bool
    temperature: torch.Tensor | None  # float32 [B], 1.0 on greedy rows; None when every row's is 1.0
    top_k: torch.Tensor | None  # int64 [B], vocab_size where off; None when no row filters
    top_p: torch.Tensor | None  # float32 [B], 1.0 where off
    min_p: torch.Tensor | None  # float32 [B], 0.0 where off
    repetition_penalty: torch.Tensor | None  # float32 [B, 1]; None when all rows are 1.0
    seen_mask: torch.Tensor | None  # bool [B, V]: token occurs in prompt or output
    frequency_penalty: torch.Tensor | None  # float32 [B, 1]; None when all presence/frequency are 0
    presence_penalty: torch.Tensor | None  # float32 [B, 1]
    output_counts: torch.Tensor | None  # float32 [B, V]: occurrences in the output
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) masked: min_tokens, bad_words
    max_num_logprobs: int | None  # widest top-N asked for; None when no row wants logprobs
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, bias)
    allowed: torch.Tensor | None = None  # bool [B, V]: False where allowed_token_ids rules a token out
    token_bitmask: torch.Tensor | None = None  # int32 [B, ceil(V/32)] grammar masks (bit set = allowed)
    race_temperature: torch.Tensor | None = None  # float32 [B], 0 on greedy rows: set when the fused race applies
    awaits_bans: bool = False  # a row has a bad word of several tokens: its ban comes when the others are out
    awaits_grammar: bool = False  # a row's grammar starts after a token (the end of reasoning): no mask before it

    @property
    def size(self) -> int:
        return len(self.generators)

    @property
    def penalized(self) -> bool:
        """Some row's logits depend on its output so far: penalties, a ban (min_tokens, bad words; or a bad word's
        ban still to come), a grammar's mask (or one still to come: a grammar waiting for the end of reasoning).
        (A step launched before the previous one is read cannot build them: overlapped steps rebuild these after
        reading it.)"""
        return (
            self.awaits_bans
            or self.awaits_grammar
            or self.repetition_penalty is not None
            or self.output_counts is not None
            or self.banned is not None
            or self.token_bitmask is not None
        )

    @property
    def reshaped(self) -> bool:
        """Something changes the raw logits before the argmax: the above, or logit_bias, or allowed_token_ids."""
        return self.reshaped_beyond_mask or self.token_bitmask is not None

    @property
    def reshaped_beyond_mask(self) -> bool:
        """Something besides a grammar's mask changes the logits (the fused kernel applies masks only)."""
        return (
            self.repetition_penalty is not None
            or self.output_counts is not None
            or self.banned is not None
            or self.logit_bias is not None
            or self.allowed is not None
        )

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompt_ids: list[TokenIds],
        output_ids: list[TokenIds],
        eos_token_ids: set[int],
        vocab_size: int,
        device: torch.device | str,
        token_bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """One row per logits row: its params, its generator (None = global RNG) and its token history; with
        structured outputs, the rows' packed grammar masks, already on the device (engine/structured_output.py)."""
        rows = _num_rows(params, generators, prompt_ids, output_ids)
        device = torch.device(device)
        greedy = [p.greedy for p in params]

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return to_device(values, dtype, device)

        temperature = [1.0 if g else float(p.temperature) for p, g in zip(params, greedy)]
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 and not g else vocab_size for p, g in zip(params, greedy)]
        top_p = [1.0 if g else float(p.top_p) for p, g in zip(params, greedy)]
        min_p = [0.0 if g else float(p.min_p) for p, g in zip(params, greedy)]
        rep = [float(p.repetition_penalty) for p in params]
        rep_rows = [i for i, r in enumerate(rep) if r != 1.0]
        seen = {i: (prompt_ids[i], output_ids[i]) for i in rep_rows}
        freq = [float(p.frequency_penalty) for p in params]
        pres = [float(p.presence_penalty) for p in params]
        pen_rows = [i for i in range(rows) if freq[i] != 0.0 or pres[i] != 0.0]
        counts = {i: (output_ids[i],) for i in pen_rows}
        banned_rows, banned_ids = _bans(params, output_ids, eos_token_ids, vocab_size)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        batch = cls(
            vocab_size=vocab_size,
            device=device,
            generators=list(generators),
            greedy=column(greedy, torch.bool) if any(greedy) and not all(greedy) else None,
            any_greedy=any(greedy),
            all_greedy=all(greedy),
            temperature=column(temperature) if any(t != 1.0 for t in temperature) else None,
            top_k=column(top_k, torch.int64) if any(k < vocab_size for k in top_k) else None,
            top_p=column(top_p) if any(v < 1.0 for v in top_p) else None,
            min_p=column(min_p) if any(v > 0.0 for v in min_p) else None,
            repetition_penalty=column(rep).unsqueeze(1) if rep_rows else None,
            seen_mask=_token_counts(seen, rows, vocab_size, device).gt(0) if rep_rows else None,
            frequency_penalty=column(freq).unsqueeze(1) if pen_rows else None,
            presence_penalty=column(pres).unsqueeze(1) if pen_rows else None,
            output_counts=_token_counts(counts, rows, vocab_size, device) if pen_rows else None,
            banned=(column(banned_rows, torch.int64), column(banned_ids, torch.int64)) if banned_rows else None,
            max_num_logprobs=max(asked) if asked else None,
            logit_bias=_logit_bias(params, device),
            allowed=_allowed_mask(params, vocab_size, device),
            token_bitmask=token_bitmask,
            awaits_bans=any(len(word) > 1 for p in params for word in p.bad_words_token_ids or ()),
            awaits_grammar=_grammar_waits(params),
        )
        if race_applies(batch):
            batch.race_temperature = column([0.0 if g else t for t, g in zip(temperature, greedy)])
        return batch


def _grammar_waits(params: list[SamplingParams]) -> bool:
    """A row's grammar starts only after a token (the end of a thinking model's reasoning): until it comes, the row
    has no mask to make the batch rebuild after each step, yet its first mask must follow that step (once the grammar
    has started, its masks mark the batch anyway)."""
    return any(p.structured_outputs is not None and p.structured_outputs.start_after_token is not None for p in params)


def race_applies(batch: SamplingBatch) -> bool:
    """kernels/sampling.py can draw this batch in one pass: a GPU with Triton, some row samples, and none filters
    (top-k/top-p/min-p) or has its own seed (its draws must depend on that seed alone). What reshapes the logits
    is checked by `sample`: a step's grammar masks join its batch after it is built (decoder.py: _next_batch)."""
    return (
        batch.device.type == "cuda"
        and triton_installed()
        and not batch.all_greedy
        and batch.top_k is None
        and batch.top_p is None
        and batch.min_p is None
        and all(g is None for g in batch.generators)
    )


def _num_rows(params: list, generators: list, prompt_ids: list, output_ids: list) -> int:
    rows = len(params)
    if not (len(generators) == len(prompt_ids) == len(output_ids) == rows):
        raise ValueError(
            f"SamplingBatch.build needs one entry per row: {rows} params, {len(generators)} generators, "
            f"{len(prompt_ids)} prompts, {len(output_ids)} outputs"
        )
    return rows


def _bans(
    params: list[SamplingParams],
    output_ids: list[TokenIds],
    eos_token_ids: set[int],
    vocab_size: int,
) -> tuple[list[int], list[int]]:
    """(rows, token ids) to mask: a row short of its min_tokens may not sample a token that would stop it, and a bad
    word's last token is banned after the word's other tokens."""
    banned_rows, banned_ids = [], []
    for i, p in enumerate(params):
        short = len(output_ids[i]) < p.min_tokens  # (never with a grammar: SamplingParams refuses both)
        if not short and not p.bad_words_token_ids:
            continue  # (the common case, at every step for every row: nothing to build)
        banned: set[int] = set()
        if short:
            # EOS too with ignore_eos: vLLM's min_tokens bans all_stop_token_ids, which always hold the EOS
            banned |= set(p.stop_token_ids) | set(eos_token_ids)
        if p.bad_words_token_ids:
            banned |= _bad_word_bans(p.bad_words_token_ids, output_ids[i])
        for token in sorted(t for t in banned if 0 <= t < vocab_size):
            banned_rows.append(i)
            banned_ids.append(token)
    return banned_rows, banned_ids


def check_allowed_tokens(
    params: SamplingParams, eos_token_ids: set[int], vocab_size: int, grammar_first: np.ndarray | None = None
) -> None:
    """allowed_token_ids, and the tokens a structured output's grammar may begin with (`grammar_first`: a bool per
    token), must leave a token to sample at the first step, after `_bans` (min_tokens bans the tokens that would
    stop the row, a one-token bad word its token): a row whose every token is masked has no distribution (its
    argmax would be token 0, allowed or not)."""
    if not params.allowed_token_ids and grammar_first is None:
        return
    _, banned = _bans([params], [[]], eos_token_ids, vocab_size)
    left = np.zeros(vocab_size, dtype=bool) if params.allowed_token_ids else np.ones(vocab_size, dtype=bool)
    left[list(params.allowed_token_ids or [])] = True  # (ids checked against the vocabulary already)
    if grammar_first is not None:
        left &= grammar_first
    left[banned] = False
    if left.any():
        return
    if grammar_first is None:
        raise ValueError(
            f"allowed_token_ids: every token it allows is banned (min_tokens={params.min_tokens} bans EOS and "
            "stop_token_ids until that many tokens; a one-token bad word always): nothing is left to sample"
        )
    if not grammar_first.any():
        raise ValueError("structured outputs: the grammar allows no token to begin the output with")
    field = "allowed_token_ids" if params.allowed_token_ids else "bad_words"
    raise ValueError(
        f"{field}: no token the output's grammar (structured outputs) may begin with is left to sample once "
        "allowed_token_ids and bad_words have masked the rest"
    )


def check_bad_words(words: list[str] | None, max_count: int) -> None:
    """The bound on a request's bad_words (EngineConfig.max_bad_words): every step matches each of them against
    the output of every row that has them."""
    if words and len(words) > max_count:
        raise ValueError(f"bad_words: {len(words)} words, more than the limit of {max_count} (max_bad_words)")


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Each bad word as tokens, alone and after a space (how it reads at the start vs inside a text), its leading
    spaces dropped and its trailing ones kept, as vLLM's SamplingParams.update_from_tokenizer reads it (vLLM keeps
    the spaced spelling only where it is as many tokens with another first token: README, where miniserve
    differs): what SamplingParams.bad_words_token_ids holds."""
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def _bad_word_bans(words: list[list[int]], output_ids: TokenIds) -> set[int]:
    """A bad word's last token is banned where the output ends with the word's other tokens (vLLM's rule)."""
    banned = set()
    for word in words:
        prefix = word[:-1]
        if len(prefix) <= len(output_ids) and (
            not prefix or list(output_ids[len(output_ids) - len(prefix) :]) == prefix
        ):
            banned.add(word[-1])
    return banned


def _logit_bias(params: list[SamplingParams], device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """(rows, token ids, values) of every row's logit_bias on `device`; None when no row has one."""
    rows, ids, values = [], [], []
    for i, p in enumerate(params):
        for token, value in (p.logit_bias or {}).items():
            rows.append(i)
            ids.append(token)
            values.append(value)
    if not rows:
        return None
    return (
        to_device(rows, torch.int64, device),
        to_device(ids, torch.int64, device),
        to_device(values, torch.float32, device),
    )


def _allowed_mask(params: list[SamplingParams], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """bool [B, V]: False where a row's allowed_token_ids rule a token out; None when no row restricts."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return None
    allowed = torch.ones(len(params), vocab_size, dtype=torch.bool, device=device)
    allowed[to_device(rows, torch.int64, device)] = False
    index = [(i, t) for i in rows for t in params[i].allowed_token_ids]
    allowed[
        to_device([i for i, _ in index], torch.int64, device), to_device([t for _, t in index], torch.int64, device)
    ] = True
    return allowed


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Mask `logits` [B, V] in place to -inf where the packed bitmask [B, ceil(V/32)] (int32, bit j of word w =
    token 32w + j, set = allowed) has a 0 bit: xgrammar's layout, unpacked on the logits' device."""
    banned = (bitmask.unsqueeze(-1) & _bit_values(bitmask.device)).eq(0).flatten(1)[:, : logits.shape[1]]
    return logits.masked_fill_(banned, -math.inf)


_BITS: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """int32 [32]: 1 << j (bit 31 is the sign bit), made once per device: three launches unpack a mask, not six."""
    if device not in _BITS:
        _BITS[device] = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)
    return _BITS[device]


def _token_counts(
    histories: dict[int, tuple[TokenIds, ...]], rows: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """float32 [rows, V] occurrence counts of each row's token parts (lists or numpy arrays: Sequence.token_array's
    views copy in one go); rows missing from `histories` stay zero."""
    counts = torch.zeros(rows, vocab_size + 1, dtype=torch.float32, device=device)
    width = max((sum(map(len, parts)) for parts in histories.values()), default=0)
    if width:
        # written through numpy, in place: no CPU torch op that could wake torch's OpenMP workers beside a grammar
        # mask fill (structured_output.MaskFiller); on a GPU straight into pinned memory, copied asynchronously
        host = torch.empty((rows, width), dtype=torch.int64, pin_memory=device.type == "cuda")
        index = host.numpy()
        index.fill(vocab_size)  # pad column = vocab_size, dropped
        for i, parts in histories.items():
            start = 0
            for part in parts:
                index[i, start : start + len(part)] = part
                start += len(part)
        np.clip(index, 0, vocab_size, out=index)
        index = host.to(device, non_blocking=True)
        counts.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]


# ---------------------------------------------------------------------------- logits -> distribution


def apply_penalties_and_filters(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Token masks (allowed_token_ids), logit_bias, penalties, min_tokens/bad-word bans, the grammar mask,
    temperature, then min-p, top-k, top-p (vLLM's order); returns a new float32 tensor."""
    if logits.dim() != 2 or logits.shape[0] != batch.size:
        raise ValueError(f"logits must be [{batch.size}, vocab], got {tuple(logits.shape)}")
    if logits.shape[1] != batch.vocab_size:
        raise ValueError(f"logits have {logits.shape[1]} columns but the batch was built for {batch.vocab_size}")
    scaled = batch.temperature is not None and not batch.reshaped
    if scaled:  # temperature alone: the division makes the float32 copy (one pass over the logits, same values)
        logits = torch.div(logits, batch.temperature.unsqueeze(1))
    else:
        logits = logits.to(torch.float32, copy=True)
    if batch.allowed is not None:
        logits.masked_fill_(~batch.allowed, -math.inf)
    if batch.logit_bias is not None:
        rows, ids, values = batch.logit_bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if batch.repetition_penalty is not None:
        # HF/vLLM: a seen token's logit is divided by the penalty when positive, multiplied when negative
        penalized = torch.where(logits > 0, logits / batch.repetition_penalty, logits * batch.repetition_penalty)
        logits = torch.where(batch.seen_mask, penalized, logits)
    if batch.output_counts is not None:
        logits -= batch.frequency_penalty * batch.output_counts
        logits -= batch.presence_penalty * (batch.output_counts > 0).to(torch.float32)
    if batch.banned is not None:
        logits[batch.banned] = -math.inf
    if batch.token_bitmask is not None:
        apply_token_bitmask(logits, batch.token_bitmask)
    if batch.temperature is not None and not scaled:
        logits /= batch.temperature.unsqueeze(1)
    if batch.min_p is not None:  # before top-k/top-p, as vLLM: min_p reads the whole tempered distribution
        probs = torch.softmax(logits, dim=-1)
        threshold = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, -math.inf)
    if batch.top_k is not None or batch.top_p is not None:
        logits = _top_k_top_p(logits, batch.top_k, batch.top_p)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep each row's k largest logits (and any tied with the k-th, as vLLM), then the smallest prefix whose
    probability mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    positions = torch.arange(logits.shape[1], device=logits.device)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
    if top_p is not None:
        drop = (_mass_from(torch.softmax(sorted_logits, dim=-1)) <= 1.0 - top_p.unsqueeze(1)) & (positions > 0)
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _mass_from(sorted_probs: torch.Tensor) -> torch.Tensor:
    """Each position's mass from there to the end (a descending row's tail), summed from the smallest up, as vLLM's
    ascending cumsum: a token is cut where its tail is within 1 - top_p. In float32 a running sum from the largest
    reaches 1.0 with ~1e-5 of a 152k vocabulary's tail still to come, so cutting where the mass before a token
    reached top_p dropped that tail on rows with top_p 1.0 beside a top-p row, and kept less than top_p."""
    return sorted_probs.flip(-1).cumsum(dim=-1).flip(-1)


def probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution tokens are drawn from (float32 [B, V]); greedy rows are one-hot at the argmax."""
    filtered = apply_penalties_and_filters(logits, batch)
    if batch.any_greedy:
        one_hot = torch.zeros_like(filtered).scatter_(1, filtered.argmax(dim=-1, keepdim=True), 1.0)
        if batch.all_greedy:
            return one_hot
    out = torch.softmax(filtered, dim=-1)
    return torch.where(batch.greedy.unsqueeze(1), one_hot, out) if batch.any_greedy else out


# ---------------------------------------------------------------------------- drawing


def random_uniform(batch: SamplingBatch, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """U[0, 1) of shape [B, *shape]; seeded rows draw from their own generator, others from the global RNG."""
    out = torch.rand((batch.size, *shape), device=batch.device)
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            out[row] = torch.rand(shape, generator=generator, device=batch.device)
    return out


def draw_noise(batch: SamplingBatch) -> torch.Tensor | None:
    """The noise `sample` would draw for `batch` (None: every row is greedy, or the fused race draws its own),
    drawn ahead: the decoder launches it while the host fills a step's grammar masks and passes it to `sample`
    (seeded rows' draws are as many and in the same order, so the samples do not change)."""
    return None if batch.all_greedy or races(batch) else _exponential(batch, batch.vocab_size)


def races(batch: SamplingBatch) -> bool:
    """`sample` draws this batch with the fused race (kernels/sampling.py), grammar masks and all."""
    return (
        batch.race_temperature is not None and not batch.reshaped_beyond_mask and covers(batch.size, batch.vocab_size)
    )


def _exponential(batch: SamplingBatch, width: int) -> torch.Tensor:
    """Exp(1) noise [B, width] for the race, per-row generators where seeded; never exactly 0."""
    noise = torch.empty(batch.size, width, device=batch.device)
    if any(g is None for g in batch.generators):
        noise.exponential_()
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def sample_from_probs(probs: torch.Tensor, batch: SamplingBatch, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from `probs` [B, V] (int64 [B]); greedy rows take the argmax."""
    if batch.all_greedy:
        return probs.argmax(dim=-1)
    noise = _exponential(batch, probs.shape[1]) if noise is None else noise
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(batch.greedy, probs.argmax(dim=-1), drawn) if batch.any_greedy else drawn


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (int64 [B]), torch.argmax's rules; on a GPU in two small launches (kernels/sampling.py),
    where torch's reduction over a 128k vocabulary took 28 us at batch 1 (`profile_decode_llama1b_b1_h200.json`)."""
    return gumbel_argmax(logits, None, 0) if _fused(logits) else logits.argmax(dim=-1)


def _fused(logits: torch.Tensor) -> bool:
    """kernels/sampling.py can take these logits: a GPU with Triton, within the kernel's bounds."""
    return logits.is_cuda and triton_installed() and covers(*logits.shape)


def token_ranks(logprobs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """vLLM's rank of each row's chosen token: how many tokens are at least as likely ([R, V], [R, 1] -> [R])."""
    return (logprobs >= chosen).sum(dim=-1)


def race_seed() -> int:
    """The fused race's noise seed for one step, from torch's global generator (torch.manual_seed repeats it)."""
    return int(torch.randint(2**31 - 1, (1,)).item())


def sample(logits: torch.Tensor, batch: SamplingBatch, noise: torch.Tensor | None = None) -> SamplerOutput:
    """One token per row and, when any row asked for logprobs, the sampled token's logprob under the raw model
    distribution and the top-N raw logprobs (a full-vocabulary log_softmax is only paid for then); a row's grammar
    mask applies to them, as in vLLM (a token it bans has logprob -inf).

    `logits` may be fp32 or the model's dtype: every computation below runs in fp32 (the penalties' and the
    temperature's first operation makes the fp32 copy), except a plain greedy argmax, which the exact conversion
    cannot change."""
    if batch.all_greedy and not batch.reshaped:
        token_ids = argmax(logits)  # nothing reshapes the logits: skip the copy
    elif batch.all_greedy and not batch.reshaped_beyond_mask and _fused(logits):  # the same bits, two launches
        token_ids = gumbel_argmax(logits, None, 0, batch.token_bitmask)
    elif batch.all_greedy:
        token_ids = apply_penalties_and_filters(logits, batch).argmax(dim=-1)
    elif noise is None and races(batch):
        token_ids = gumbel_argmax(logits, batch.race_temperature, race_seed(), batch.token_bitmask)
    else:
        token_ids = sample_from_probs(probs(logits, batch), batch, noise)
    if batch.max_num_logprobs is None:
        return SamplerOutput(token_ids=token_ids, logprobs=None, top_logprobs=None)
    raw = logits.to(torch.float32, copy=batch.token_bitmask is not None)
    if batch.token_bitmask is not None:  # as vLLM, whose grammar masks the logits first: what it bans is -inf
        apply_token_bitmask(raw, batch.token_bitmask)
    raw_logprobs = torch.log_softmax(raw, dim=-1)
    logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    values, ids = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
    ranks = token_ranks(raw_logprobs, logprobs.unsqueeze(1))
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=(ids, values), ranks=ranks)
