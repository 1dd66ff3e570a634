"""The model-guided false-negative filter (`guided_negative_margin`): what it flags, and that the trainer applies it."""

from __future__ import annotations

import pytest
import torch

from hf_clipneg.losses import WeightedContrastiveLoss
from hf_clipneg.mining import model_guided_flags
from trainer_steps import mine_tiny, one_step, tiny_trainer


def test_flags_follow_the_margin_in_both_directions():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])  # text 1 leans towards image 2
    # cos(image 2, text 1) = 0.8 > cos(image 1, text 1) - 0.25 = 0.35: text 1's query ranks image 2 near its own
    assert model_guided_flags(images, texts, margin=0.25).nonzero().tolist() == [[2, 1]]
    assert not model_guided_flags(images, texts, margin=-2.0).any()
    assert model_guided_flags(images, texts, margin=2.0).sum() == 6  # every off-diagonal pair
    assert not model_guided_flags(images, texts, margin=2.0).diagonal().any()


@pytest.fixture(scope="module")
def mined():
    return mine_tiny(num_rows=32)


def test_the_trainer_masks_the_flagged_negatives(tmp_path, mined):
    vanilla, _, _ = one_step(tiny_trainer(tmp_path, mined, negative_strategy="vanilla"))
    unflagged, _, _ = one_step(tiny_trainer(tmp_path, mined, negative_strategy="vanilla", guided_negative_margin=-2.0))
    everything, _, _ = one_step(tiny_trainer(tmp_path, mined, negative_strategy="vanilla", guided_negative_margin=2.0))
    torch.testing.assert_close(unflagged, vanilla)
    torch.testing.assert_close(everything, torch.tensor(0.0), atol=1e-6, rtol=0)  # only positives are left

    # Frozen towers: the batch holds the tower features the projections embed again below.
    trainer = tiny_trainer(tmp_path, mined, negative_strategy="vanilla", guided_negative_margin=0.0,
                           tower_training="frozen")
    guided, _, batch = one_step(trainer)
    model_inputs = {k: v for k, v in batch.items() if k in ("image_tower_features", "text_tower_features")}
    with torch.no_grad():
        outputs = trainer.model(**model_inputs)
    flags = model_guided_flags(outputs.image_embeds, outputs.text_embeds, 0.0)
    assert flags.any() and not flags.all()
    expected = WeightedContrastiveLoss()(outputs.image_embeds, outputs.text_embeds, trainer.model.logit_scale,
                                        negative_weights=(~flags).float())
    torch.testing.assert_close(guided, expected.detach(), atol=1e-6, rtol=0)
