"""ClipNegTrainer.compute_loss follows the negative strategy: one model, one batch, a different loss per strategy."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_clipneg.mining import MiningConfig, mine_negatives
from hf_clipneg.data import make_synthetic_pairs
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer
from hf_clipneg.training import ClipNegTrainingArguments

STRATEGIES = ("vanilla", "random", "cluster", "cluster_weighted")
BATCH_ROWS = 8


@pytest.fixture(scope="module")
def losses_by_strategy(tmp_path_factory):
    """{strategy: (loss, batch)} of `compute_loss` on the first 8 rows, for the same model weights."""
    torch.manual_seed(0)
    model, processor = build_tiny_dual_encoder()
    pairs = make_synthetic_pairs(num_rows=24, seed=0, image_size=32)
    # The default evidence (frozen image cosine) with its threshold at the median pair cosine: about half of
    # the in-batch pairs are flagged, so every strategy but vanilla changes the weights of a batch.
    mined, _ = mine_negatives(pairs, MiningConfig(pair_quantile=0.5, negatives_per_row=0), model=model, processor=processor)
    results = {}
    for strategy in STRATEGIES:
        args = ClipNegTrainingArguments(
            output_dir=str(tmp_path_factory.mktemp(strategy)), negative_strategy=strategy,
            per_device_train_batch_size=BATCH_ROWS, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
            tower_training="frozen",  # batches of cached tower features, compared below
        )
        trainer = ClipNegTrainer(
            model=copy.deepcopy(model), args=args, train_dataset=mined, processing_class=processor
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH_ROWS)])
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        results[strategy] = (loss.item(), batch)
    return results


def test_every_strategy_sees_the_same_batch(losses_by_strategy):
    _, reference = losses_by_strategy["vanilla"]
    for strategy in STRATEGIES[1:]:
        _, batch = losses_by_strategy[strategy]
        for key in ("image_tower_features", "text_tower_features"):
            torch.testing.assert_close(batch[key], reference[key], rtol=0, atol=0, msg=f"{strategy}: {key}")


def test_compute_loss_differs_between_strategies(losses_by_strategy):
    loss = {strategy: value for strategy, (value, _) in losses_by_strategy.items()}
    assert all(torch.isfinite(torch.tensor(value)) for value in loss.values())
    # A compute_loss that ignored the strategy (or used the dataset's stored one) would give equal losses here.
    for i, first in enumerate(STRATEGIES):
        for second in STRATEGIES[i + 1 :]:
            assert loss[first] != pytest.approx(loss[second], rel=1e-6, abs=1e-7), (first, second, loss)
    # Masking only removes negatives from the denominators: the masked strategies' losses lie below vanilla's.
    assert loss["cluster"] < loss["vanilla"] and loss["random"] < loss["vanilla"]
