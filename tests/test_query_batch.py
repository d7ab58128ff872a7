"""How one forward pass is laid out when layers compute different rows."""

import pytest
import torch

from vllm_dllm.engine.query_batch import build_query_batch

BLOCK = 4


def batch(plans, lengths=(12, 10), block_ids=([7, 2, 5], [1, 9, 3])):
    sequences = [torch.arange(100 * (i + 1), 100 * (i + 1) + n) for i, n in enumerate(lengths)]
    return build_query_batch(sequences, plans, list(block_ids), BLOCK, torch.device("cpu"))


def test_one_query_set_is_one_segment():
    b = batch([[(0, torch.arange(4, 12))], [(0, torch.tensor([0, 5, 9]))]])
    assert len(b.segments) == 1 and b.layer_rows() == {}
    assert b.input_ids.tolist() == [104, 105, 106, 107, 108, 109, 110, 111, 200, 205, 209]
    m = b.metadata_for_layer(3)
    assert m.query_start_loc.tolist() == [0, 8, 11] and m.seq_lens.tolist() == [12, 10]
    # position 5 of request 1 is page 9, offset 1; position 9 is page 3, offset 1
    assert m.slot_mapping[-2:].tolist() == [9 * BLOCK + 1, 3 * BLOCK + 1]


def test_segments_cut_where_any_request_changes_its_set():
    plans = [[(0, torch.arange(2, 12)), (2, torch.tensor([3, 8, 11]))],
             [(0, torch.arange(0, 10)), (1, torch.tensor([1, 2])), (2, torch.tensor([2]))]]
    b = batch(plans)
    assert [s.first_layer for s in b.segments] == [0, 1, 2]
    rows = b.layer_rows()
    # layer 1: request 0 keeps all its 10 rows, request 1 keeps positions 1 and 2
    assert rows[1].tolist() == list(range(10)) + [11, 12]
    # layer 2: request 0 keeps positions 3, 8, 11 of its 10 rows; request 1 keeps position 2
    assert rows[2].tolist() == [1, 6, 9, 11]
    assert b.metadata_for_layer(1).query_start_loc.tolist() == [0, 10, 12]
    assert b.metadata_for_layer(5).query_start_loc.tolist() == [0, 3, 4]
    assert b.output_rows(0, torch.tensor([8, 11])).tolist() == [1, 2]
    assert b.output_rows(1, torch.tensor([2])).tolist() == [3]
    with pytest.raises(ValueError, match="does not compute"):
        b.output_rows(0, torch.tensor([4]))


def test_a_layer_cannot_add_rows():
    with pytest.raises(ValueError, match="not inside"):
        batch([[(0, torch.arange(4, 8)), (1, torch.tensor([3, 4]))], [(0, torch.arange(10))]])


def test_a_plan_starts_at_layer_zero():
    with pytest.raises(ValueError, match="layer 0"):
        batch([[(1, torch.arange(4))], [(0, torch.arange(10))]])
