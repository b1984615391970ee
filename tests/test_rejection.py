"""rejection_sample row by row, with chosen uniforms: the accept test at its boundary and the distribution each
row's next token is drawn from. Probabilities are multiples of 1/8, exact in float32; the expected counts and
residuals are worked out by hand in the comments from the rule (accept d while u < p(d) / q(d); at the first
rejection draw from normalize(max(0, p - q)), or from p if nothing is left; after k acceptances from p_k)."""

from __future__ import annotations

import torch

from miniserve.spec_decode.rejection import rejection_sample

Q = [0.25, 0.25, 0.25, 0.25]  # the uniform distribution over the 4 tokens


def test_rejection_sample_row_by_row():
    rows = [
        # (target p at positions 0, 1, 2), (draft q at 0, 1), drafts, uniforms
        # A: 0.5 / 0.25 and 0.5 / 0.25: both accepted; the bonus comes from p_2
        (
            [[0.5, 0.25, 0.125, 0.125], [0.25, 0.5, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]],
            [Q, Q],
            [0, 1],
            [0.5, 0.25],
        ),
        # B: p(2) / q(2) = 0.125 / 0.5 and u = 0.75: rejected at 0; p - q = [0.375, 0.125, -, -] over 0.5
        ([[0.5, 0.25, 0.125, 0.125], Q, Q], [[0.125, 0.125, 0.5, 0.25], Q], [2, 0], [0.75, 0.0]),
        # C: accepted at 0 (u = 0 < 2); at 1 u = p(3) / q(3) = 0.5 exactly: rejected; p - q = [0, 0.25, -, -]
        ([[0.5, 0.25, 0.125, 0.125], [0.25, 0.5, 0.125, 0.125], Q], [Q, Q], [0, 3], [0.0, 0.5]),
        # D: the target never emits the draft token (p = 0), even with u = 0: rejected; p - q = [0.25, -, 0, 0]
        ([[0.5, 0.0, 0.25, 0.25], Q, Q], [Q, Q], [1, 0], [0.0, 0.0]),
        # E: p = q and u = 1 (a rounding edge): rejected at 0 with nothing left of p - q: drawn from p
        ([Q, Q, Q], [Q, Q], [0, 0], [1.0, 0.0]),
    ]
    p = torch.tensor([r[0] for r in rows])
    q = torch.tensor([r[1] for r in rows])
    drafts = torch.tensor([r[2] for r in rows])
    uniforms = torch.tensor([r[3] for r in rows])
    drawn_from = []

    def residual_draw(probs: torch.Tensor) -> torch.Tensor:
        drawn_from.append(probs.clone())
        return torch.tensor([10, 11, 12, 13, 14])  # row i draws 10 + i: what the caller gets back

    accepted, nxt = rejection_sample(p, q, drafts, uniforms, residual_draw)
    assert accepted.tolist() == [2, 0, 1, 0, 0]
    assert nxt.tolist() == [10, 11, 12, 13, 14] and len(drawn_from) == 1
    expected = torch.tensor(
        [[0.125, 0.125, 0.25, 0.5], [0.75, 0.25, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], Q]
    )
    torch.testing.assert_close(drawn_from[0], expected, rtol=0, atol=1e-7)


def test_one_draft_token():
    # row 0: 0.5 / 0.25 with u = 0.5: accepted, the bonus from p_1; row 1: 0.125 / 0.5 with u = 0.5: rejected,
    # p - q = [0.375, 0.125, -, -] over 0.5
    p = torch.tensor([[[0.5, 0.25, 0.125, 0.125], [0.0, 0.0, 0.5, 0.5]], [[0.5, 0.25, 0.125, 0.125], Q]])
    q = torch.tensor([[Q], [[0.125, 0.125, 0.5, 0.25]]])
    drawn_from = []
    accepted, _ = rejection_sample(p, q, torch.tensor([[0], [2]]), torch.tensor([[0.5], [0.5]]), drawn_from.append)
    assert accepted.tolist() == [1, 0]
    torch.testing.assert_close(drawn_from[0], torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.75, 0.25, 0.0, 0.0]]))
