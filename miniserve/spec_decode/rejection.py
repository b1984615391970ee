"""Rejection sampling (Leviathan et al. / Chen et al.): accept draft tokens so that the output distribution is
exactly the target model's, whatever the draft proposed."""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor,  # [B, k+1, V] target distribution at each verified position
    draft_probs: torch.Tensor,  # [B, k, V] draft distribution each draft token was drawn from
    draft_tokens: torch.Tensor,  # [B, k]
    uniforms: torch.Tensor,  # [B, k] U(0,1) for the accept tests
    residual_draw,  # callable(probs [B, V]) -> tokens [B], drawing with each row's own generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard speculative sampling.

    Draft token d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the
    replacement is drawn from normalize(max(0, p_j - q_j)); if all k are accepted a bonus token is drawn from
    p_k. Returns (num_accepted [B], next_token [B]) where next_token is the replacement or the bonus.
    Greedy rows work unchanged: their p and q are one-hot, so acceptance means equality with the target argmax.
    """
    B, k = draft_tokens.shape
    p_at = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    q_at = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    accept = uniforms * q_at < p_at  # u < p/q without dividing by a zero q
    rejected = ~accept
    first_reject = torch.where(rejected.any(-1), rejected.float().argmax(-1), torch.full_like(draft_tokens[:, 0], k))
    rows = torch.arange(B, device=draft_tokens.device)
    p_next = target_probs[rows, first_reject]  # [B, V]
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)[rows, first_reject]
    residual = (p_next - q_next).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    # All accepted -> q_next is zero -> residual = p_k (the bonus). A rejection implies mass > 0 in exact
    # arithmetic; fall back to p if rounding left nothing.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return first_reject, residual_draw(residual)
