"""The one-launch metadata kernel of uniform passes against the torch construction (interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from miniserve.kernels.metadata import uniform_metadata_reference  # noqa: E402
from miniserve.kernels.uniform_metadata import uniform_metadata_triton  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("with_valid", [False, True])
def test_kernel_metadata_equals_torch_decode_queries(n, with_valid):
    g = torch.Generator().manual_seed(n)
    B, block_size, width = 5, 4, 9
    # columns of a packed [B, 3] input, as a captured CUDA graph passes them: strided, not contiguous
    packed = torch.randint(0, width * block_size - n, (B, 3), generator=g)
    packed[:, 1] = torch.tensor([1, 0, 1, 1, 0])
    start_pos = packed[:, 0]
    tables = torch.randperm(100, generator=g)[: B * width].view(B, width).to(torch.int32)
    valid = packed[:, 1:].bool()[:, 0] if with_valid else None  # strided too
    assert start_pos.stride(0) == 3 and (valid is None or valid.stride(0) == 2)
    positions, meta = uniform_metadata_triton(start_pos, valid, tables, n, block_size, max_seq_len=99)
    ref_positions, ref = uniform_metadata_reference(start_pos, valid, tables, n, block_size, max_seq_len=99)
    ref = ref.as_decode_queries()
    assert torch.equal(positions, ref_positions)
    assert torch.equal(meta.slot_mapping, ref.slot_mapping)
    assert torch.equal(meta.seq_lens, ref.seq_lens)
    assert torch.equal(meta.query_start_loc, ref.query_start_loc)
    assert torch.equal(meta.block_tables, ref.block_tables)
    assert (meta.max_query_len, meta.max_seq_len) == (1, 99)
    if with_valid:  # invalid rows write nothing; valid rows hit their own pages
        assert (meta.slot_mapping.view(B, n)[~valid] == -1).all()
        assert (meta.slot_mapping.view(B, n)[valid] >= 0).all()
