"""BlockAllocator: allocation as sequences grow, ref counts, misuse errors, usage."""
import pytest

from server.blocks import BlockAllocator, BlockError
from server.sampling_params import SamplingParams
from server.sequence import Sequence


def seq(n_prompt: int, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(3, 3 + n_prompt)), SamplingParams())


def test_allocate_slots_grows_block_table_by_need():
    a = BlockAllocator(num_blocks=8, block_size=4)
    s = seq(6)
    assert a.allocate_slots(s, 6) and len(s.block_table) == 2
    s.num_computed_tokens = 6
    assert a.allocate_slots(s, 2) and len(s.block_table) == 2  # 8 tokens still fit in 2 blocks
    assert a.allocate_slots(s, 3) and len(s.block_table) == 3
    assert a.num_free_blocks == 5 and a.usage == pytest.approx(3 / 8)
    assert all(a.ref_count(b) == 1 for b in s.block_table)


def test_all_or_nothing_when_short():
    a = BlockAllocator(num_blocks=2, block_size=4)
    s = seq(12)
    assert not a.allocate_slots(s, 12)
    assert s.block_table == [] and a.num_free_blocks == 2
    assert not a.can_allocate(3) and a.can_allocate(2)


def test_free_returns_everything_and_double_free_is_caught():
    a = BlockAllocator(num_blocks=4, block_size=4)
    s = seq(9)
    a.allocate_slots(s, 9)
    table = list(s.block_table)
    a.free(s)
    assert s.block_table == [] and a.num_free_blocks == 4 and a.usage == 0.0
    a.free(s)  # the sequence's table is empty: harmless
    with pytest.raises(BlockError, match="double free"):
        a.free_blocks(table[:1])
    with pytest.raises(BlockError, match="not in this pool"):
        a.free_blocks([99])
    with pytest.raises(BlockError):
        a.allocate(5)


def test_invalid_sizes():
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)
