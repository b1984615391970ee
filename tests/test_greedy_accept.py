"""The one-launch greedy acceptance kernel against its torch reference, and the reference against the rule
written out in plain Python."""

from __future__ import annotations

import pytest
import torch

from miniserve.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton


def rule(drafts: list[int], target: list[int], last_two: list[int], length: int) -> tuple[list[int], list[int]]:
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    before = drafts[a - 1] if a > 0 else last_two[1]
    return drafts + [a, target[a]], [before, target[a], length + a + 1]


def case(batch: int, k: int, seed: int):
    """Rows whose drafts match the target for a prefix of every length 0..k (and random tokens after it)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 50, (batch, k + 1), generator=g)
    drafts = torch.randint(0, 50, (batch, k), generator=g)
    for row in range(batch):
        a = row % (k + 1)
        drafts[row, :a] = target[row, :a]
        if a < k and drafts[row, a] == target[row, a]:
            drafts[row, a] = (target[row, a] + 1) % 50
    # as in a round: the last two tokens and the length are columns of one packed int64 buffer (strided views)
    packed = torch.randint(0, 50, (batch, 6), generator=g)
    packed[:, 2] = torch.randint(2, 1000, (batch,), generator=g)
    return drafts, target, packed[:, 0:2], packed[:, 2]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
def test_reference_is_the_greedy_rule(k):
    drafts, target, last_two, length = case(2 * (k + 1), k, k)
    result, next_columns = greedy_accept_reference(drafts, target, last_two, length)
    for row in range(drafts.shape[0]):
        want = rule(drafts[row].tolist(), target[row].tolist(), last_two[row].tolist(), int(length[row]))
        assert (result[row].tolist(), next_columns[row].tolist()) == want


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("batch", [1, 5, 17])
def test_triton_kernel_equals_reference(k, batch):
    inputs = case(batch, k, 100 * k + batch)
    got = greedy_accept_triton(*inputs)
    want = greedy_accept_reference(*inputs)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.int64 and torch.equal(g, w)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_triton_kernel_takes_inputs_whose_columns_are_strided(which):
    """The kernel reads unit-stride rows; an input with another column stride (here a transposed copy viewed
    back) is made contiguous first, whichever of drafts, target and last_two it is."""
    inputs = list(case(5, 3, 7 + which))
    inputs[which] = inputs[which].t().contiguous().t()
    assert inputs[which].stride(1) != 1
    want = greedy_accept_reference(*inputs)
    for g, w in zip(greedy_accept_triton(*inputs), want, strict=True):
        assert torch.equal(g, w)
