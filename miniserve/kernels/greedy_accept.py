"""The greedy acceptance rule of a speculative round, and the next round's inputs, in one kernel launch.

Given each row's k draft tokens and the target's argmax at the k+1 verified positions, the round accepts the
longest prefix of drafts equal to the target's choices and emits the target's token after it. The same kernel
writes what the next round starts from (its last two tokens and the sequence's new length), so an overlapped
round can be launched from the device alone (spec_decode/greedy_round.py). In torch the rule takes about fifteen small
kernels (compare, cumprod, sum, gathers, where, cats); at batch 1 each costs as much as the work itself.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference serves every call
    triton = None


def greedy_accept_reference(
    drafts: torch.Tensor,  # [B, k] int64
    target: torch.Tensor,  # [B, k+1] int64: the target's argmax at [t, d1..dk]
    last_two: torch.Tensor,  # [B, 2] int64: the round's input tokens (t-2, t-1)
    length: torch.Tensor,  # [B] int64: tokens before the round
) -> tuple[torch.Tensor, torch.Tensor]:
    """(result [B, k+2] = drafts, accepted count a, next token; next columns [B, 3] = the token before the
    next token, the next token, length + a + 1)."""
    k = drafts.shape[1]
    accepted = (drafts == target[:, :k]).int().cumprod(dim=1).sum(dim=1, keepdim=True).long()
    last = target.gather(1, accepted)
    # the token before `last`: the last accepted draft, or the round's own last token when none was accepted
    before = torch.where(accepted > 0, drafts.gather(1, (accepted - 1).clamp_min(0)), last_two[:, 1:])
    next_columns = torch.cat([before, last, length[:, None] + accepted + 1], dim=1)
    return torch.cat([drafts, accepted, last], dim=1), next_columns


if triton is not None:

    @triton.jit
    def _greedy_accept_kernel(
        drafts_ptr,
        target_ptr,
        last_two_ptr,
        length_ptr,
        result_ptr,
        next_ptr,
        stride_d,
        stride_t,
        stride_l2,
        stride_len,
        K: tl.constexpr,
        K_POW2: tl.constexpr,
    ):
        row = tl.program_id(0)
        j = tl.arange(0, K_POW2)
        in_k = j < K
        drafts = tl.load(drafts_ptr + row * stride_d + j, mask=in_k, other=0)
        target = tl.load(target_ptr + row * stride_t + j, mask=in_k, other=0)
        # the first mismatch is the accepted count (K when every draft matches)
        accepted = tl.min(tl.where((drafts != target) & in_k, j, K), axis=0)
        last = tl.load(target_ptr + row * stride_t + accepted)
        last_draft = tl.load(drafts_ptr + row * stride_d + tl.maximum(accepted - 1, 0))
        before = tl.where(accepted > 0, last_draft, tl.load(last_two_ptr + row * stride_l2 + 1))
        length = tl.load(length_ptr + row * stride_len)
        tl.store(result_ptr + row * (K + 2) + j, drafts, mask=in_k)
        tl.store(result_ptr + row * (K + 2) + K, accepted.to(tl.int64))
        tl.store(result_ptr + row * (K + 2) + K + 1, last)
        tl.store(next_ptr + row * 3, before)
        tl.store(next_ptr + row * 3 + 1, last)
        tl.store(next_ptr + row * 3 + 2, length + accepted + 1)


def greedy_accept_triton(
    drafts: torch.Tensor, target: torch.Tensor, last_two: torch.Tensor, length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`greedy_accept_reference` in one launch (inputs may be strided views, e.g. columns of a packed buffer)."""
    B, k = drafts.shape
    result = torch.empty(B, k + 2, dtype=torch.int64, device=drafts.device)
    next_columns = torch.empty(B, 3, dtype=torch.int64, device=drafts.device)
    if drafts.stride(1) != 1 or target.stride(1) != 1 or last_two.stride(1) != 1:
        drafts, target, last_two = drafts.contiguous(), target.contiguous(), last_two.contiguous()
    _greedy_accept_kernel[(B,)](
        drafts,
        target,
        last_two,
        length,
        result,
        next_columns,
        drafts.stride(0),
        target.stride(0),
        last_two.stride(0),
        length.stride(0),
        K=k,
        K_POW2=max(2, triton.next_power_of_2(k)),
    )
    return result, next_columns
