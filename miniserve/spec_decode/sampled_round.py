"""The general speculative round: per-request sampling settings, with rejection sampling.

The draft proposes k tokens one decode step at a time, each drawn from its processed distribution q (kept for
the acceptance test); the target scores [t, d1..dk] in one pass; `rejection_sample` keeps each draft with
probability min(1, p/q), so the output distribution is exactly the target's. The draft steps and the
verification are uniform passes that replay from CUDA graphs when every row brings the same number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from miniserve.engine.model_runner import ForwardInput, ModelRunner
from miniserve.engine.sampler import SamplingBatch, TokenIds, random_uniform, sample_from_probs
from miniserve.engine.sampler import probs as processed_probs
from miniserve.engine.transfer import to_device
from miniserve.scheduler.sequence import Sequence
from miniserve.spec_decode.catch_up import catch_up_input, is_uniform
from miniserve.spec_decode.rejection import rejection_sample

# (sequences, output histories or None) -> one sampling row per sequence (PlainDecoder.sampling_batch)
BatchBuilder = Callable[[list[Sequence], list[TokenIds] | None], SamplingBatch]


def _history(seq: Sequence, drafted: list[int]) -> TokenIds:
    """The output a sampling row sees: the sequence's tokens plus the drafts before it (only if it reads them)."""
    if not seq.params.needs_history:
        return []
    return np.concatenate((seq.token_array()[seq.num_prompt_tokens :], np.asarray(drafted, dtype=np.int64)))


class SampledRound:
    def __init__(self, target: ModelRunner, draft: ModelRunner, k: int, sampling_batch: BatchBuilder):
        self.target, self.draft, self.k = target, draft, k
        self.sampling_batch = sampling_batch

    def run(self, seqs: list[Sequence], base_len: list[int]):
        """Returns (drafts per sequence, accepted counts, next tokens, the target's logits [B*(k+1), V])."""
        drafts, draft_probs = self._propose(seqs, base_len)
        accepted, next_tokens, logits = self._verify(seqs, drafts, draft_probs)
        return drafts, accepted, next_tokens, logits

    def _propose(self, seqs: list[Sequence], base_len: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
        """The draft catches up on tokens it has not seen and proposes k tokens, one decode step each."""
        drafts: list[list[int]] = [[] for _ in seqs]
        draft_probs = []
        if is_uniform(seqs, base_len):  # the last two tokens for everyone: a captured two-token pass
            inputs = [ForwardInput(s.token_ids[-2:], n - 2, s.block_array(), 1) for s, n in zip(seqs, base_len)]
        else:
            inputs = [catch_up_input(s) for s in seqs]
        # without penalties no row reads its history: one sampling batch serves every draft step
        fixed = None if any(s.params.needs_history for s in seqs) else self.sampling_batch(seqs, None)
        for j in range(self.k):
            logits = self.draft.forward(inputs)
            batch = fixed
            if batch is None:
                batch = self.sampling_batch(seqs, [_history(s, d) for s, d in zip(seqs, drafts)])
            q = processed_probs(logits, batch)
            tokens = sample_from_probs(q, batch).tolist()
            draft_probs.append(q)
            for i in range(len(seqs)):
                drafts[i].append(tokens[i])
            inputs = [ForwardInput([tokens[i]], base_len[i] + j, s.block_array(), 1) for i, s in enumerate(seqs)]
        return drafts, draft_probs

    def _verify(self, seqs: list[Sequence], drafts: list[list[int]], draft_probs: list[torch.Tensor]):
        """The target scores [t, d1..dk] for every sequence in one forward pass (as decode queries on the
        Triton backend); rejection sampling decides."""
        k = self.k
        verify = [
            ForwardInput([s.token_ids[-1]] + d, s.num_tokens - 1, s.block_array(), k + 1) for s, d in zip(seqs, drafts)
        ]
        logits = self.target.forward(verify)  # [B*(k+1), V]
        rows_seqs = [s for s in seqs for _ in range(k + 1)]
        histories = [_history(s, d[:j]) for s, d in zip(seqs, drafts) for j in range(k + 1)]
        p = processed_probs(logits, self.sampling_batch(rows_seqs, histories)).view(len(seqs), k + 1, -1)
        seq_batch = self.sampling_batch(seqs, None)
        draft_tokens = to_device(drafts, torch.int64, logits.device)
        uniforms = random_uniform(seq_batch, (k,))
        accepted, next_tokens = rejection_sample(
            p, torch.stack(draft_probs, dim=1), draft_tokens, uniforms, lambda r: sample_from_probs(r, seq_batch)
        )
        return accepted.tolist(), next_tokens.tolist(), logits
