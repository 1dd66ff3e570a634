"""The quality benchmark's batch orders: plain shuffled epochs and batches crowded along groups."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _quality_lib as Q  # noqa: E402

GROUPS = torch.arange(40).repeat_interleave(25)  # 1,000 rows in 40 groups of 25


def _groups_per_batch(order):
    return torch.tensor([len(torch.unique(GROUPS[batch])) for batch in order]).float()


def test_plain_order_is_a_permutation_per_epoch_and_same_for_a_seed():
    order = Q.batch_order(1000, 20, 100, seed=0)
    assert order.shape == (20, 100)
    assert len(torch.unique(order[:10])) == 1000 and len(torch.unique(order[10:])) == 1000
    assert torch.equal(order, Q.batch_order(1000, 20, 100, seed=0))
    assert not torch.equal(order, Q.batch_order(1000, 20, 100, seed=1))


def test_crowded_order_concentrates_groups_and_never_repeats_stream_rows():
    plain = Q.batch_order(1000, 10, 100, seed=0, groups=GROUPS, mix=0.0)
    full = Q.batch_order(1000, 10, 100, seed=0, groups=GROUPS, mix=1.0)
    half = Q.batch_order(1000, 10, 100, seed=0, groups=GROUPS, mix=0.5)
    assert len(torch.unique(full)) == 1000  # one epoch of the sorted stream: every row once
    assert _groups_per_batch(full).max() <= 5  # 100 consecutive rows of 25-row groups: 4 groups (5 if unaligned)
    assert _groups_per_batch(plain).mean() > 30
    assert _groups_per_batch(full).mean() < _groups_per_batch(half).mean() < _groups_per_batch(plain).mean()
    assert len(torch.unique(half[:, :50])) == 500  # the crowded half of each batch comes from the stream, once each
