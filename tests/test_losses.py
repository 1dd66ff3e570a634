"""WeightedContrastiveLoss: CLIP in the degenerate case, masking, weighting, mined negatives, soft positives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.vision_text_dual_encoder.modeling_vision_text_dual_encoder import (
    image_text_contrastive_loss,
)

from hf_clipneg.losses import WeightedContrastiveLoss, gather_features, gather_metadata, weighted_contrastive_loss

LOGIT_SCALE = torch.tensor(math.log(1 / 0.07))


def _embeds(batch: int = 6, dim: int = 8, seed: int = 0, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, dim, generator=generator, requires_grad=requires_grad)
    texts = torch.randn(batch, dim, generator=generator, requires_grad=requires_grad)
    return images, texts


def _logits(batch: int = 5, seed: int = 0) -> torch.Tensor:
    return (torch.randn(batch, batch, generator=torch.Generator().manual_seed(seed)) * 3).requires_grad_()


def _logit_grad(**kwargs) -> torch.Tensor:
    logits = _logits(kwargs.pop("batch", 5))
    weighted_contrastive_loss(logits, **kwargs).backward()
    return logits.grad


def _clip_loss(images, texts, logit_scale):
    """What VisionTextDualEncoderModel.forward does with its projected embeddings."""
    images = images / images.norm(dim=-1, keepdim=True)
    texts = texts / texts.norm(dim=-1, keepdim=True)
    return image_text_contrastive_loss(texts @ images.T * logit_scale.exp())


# --- the degenerate case is CLIP -----------------------------------------------------------------------------


def test_equals_transformers_clip_loss_and_gradients():
    images, texts = _embeds(requires_grad=True)
    scale = LOGIT_SCALE.clone().requires_grad_()
    ours = WeightedContrastiveLoss()(images, texts, scale)
    ours_grads = torch.autograd.grad(ours, (images, texts, scale))
    theirs = _clip_loss(images, texts, scale)
    theirs_grads = torch.autograd.grad(theirs, (images, texts, scale))
    assert abs(ours.item() - theirs.item()) < 1e-6
    for mine, reference in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)


def test_all_ones_weights_equal_clip_loss():
    images, texts = _embeds()
    loss = WeightedContrastiveLoss()(
        images, texts, LOGIT_SCALE, negative_weights=torch.ones(6, 6), positive_weights=torch.eye(6)
    )
    torch.testing.assert_close(loss, _clip_loss(images, texts, LOGIT_SCALE), atol=1e-6, rtol=1e-6)


def test_equals_vision_text_dual_encoder_return_loss(tiny_dual_encoder):
    model, processor = tiny_dual_encoder
    from PIL import Image

    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green", "white")]
    texts = ["a red circle", "a blue square", "a green star", "a white ring"]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs, return_loss=True)
        ours = WeightedContrastiveLoss()(outputs.image_embeds, outputs.text_embeds, model.logit_scale)
    assert abs(ours.item() - outputs.loss.item()) < 1e-6


# --- masking and weighting -----------------------------------------------------------------------------------


def test_masked_pair_gets_exactly_zero_gradient():
    weights = torch.ones(5, 5)
    weights[1, 3] = 0.0
    grad = _logit_grad(negative_weights=weights)
    assert grad[1, 3].item() == 0.0  # neither image 1's row nor text 3's row sees s_13
    assert grad[3, 1].item() != 0.0  # the mirror pair (image 3, text 1) is a different pair, still pushed
    assert grad[1, 2].item() > 0.0


def test_masked_pair_does_not_change_the_loss_when_its_similarity_changes():
    weights = torch.ones(5, 5)
    weights[2, 0] = 0.0
    logits = _logits().detach()
    moved = logits.clone()
    moved[2, 0] += 10.0
    assert weighted_contrastive_loss(logits, weights) == weighted_contrastive_loss(moved, weights)


def test_down_weighting_shrinks_the_pair_gradient():
    magnitudes = []
    for value in (0.0, 0.3, 1.0, 3.0):
        weights = torch.ones(5, 5)
        weights[0, 4] = value
        magnitudes.append(_logit_grad(negative_weights=weights)[0, 4].abs().item())
    assert magnitudes[0] == 0.0
    assert magnitudes[0] < magnitudes[1] < magnitudes[2] < magnitudes[3]


def test_diagonal_of_negative_weights_is_ignored():
    weights = torch.rand(5, 5, generator=torch.Generator().manual_seed(3)) * 2
    zero_diagonal = weights.clone().fill_diagonal_(0.0)
    logits = _logits().detach()
    assert weighted_contrastive_loss(logits, weights) == weighted_contrastive_loss(logits, zero_diagonal)


def test_all_negatives_masked_gives_zero_loss_and_no_nan():
    images, texts = _embeds(requires_grad=True)
    scale = LOGIT_SCALE.clone().requires_grad_()
    loss = WeightedContrastiveLoss()(images, texts, scale, negative_weights=torch.zeros(6, 6))
    loss.backward()
    assert loss.item() == 0.0
    for tensor in (images, texts, scale):
        assert torch.isfinite(tensor.grad).all()


def test_weights_that_require_grad_do_not_produce_nan():
    weights = torch.rand(5, 5, generator=torch.Generator().manual_seed(0))
    weights[0, 1] = 0.0
    weights.requires_grad_()
    weighted_contrastive_loss(_logits(), weights).backward()
    assert torch.isfinite(weights.grad).all()


# --- mined negatives -------------------------------------------------------------------------------------------


def test_mined_negatives_increase_the_loss_and_get_gradient():
    images, texts = _embeds()
    generator = torch.Generator().manual_seed(7)
    mined = torch.randn(6, 3, 8, generator=generator, requires_grad=True)
    loss_fn = WeightedContrastiveLoss()
    plain = loss_fn(images, texts, LOGIT_SCALE)
    with_mined = loss_fn(images, texts, LOGIT_SCALE, mined_text_embeds=mined, mined_text_weights=torch.ones(6, 3))
    assert with_mined > plain
    with_mined.backward()
    assert (mined.grad.abs().sum(dim=-1) > 0).all()


def test_padding_mined_texts_are_ignored_even_as_zero_vectors():
    images, texts = _embeds()
    mined = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(7))
    mined[:, 2] = 0.0  # collator padding
    mined.requires_grad_()
    mined_weights = torch.tensor([[1.0, 2.0, 0.0]] * 6)
    loss_fn = WeightedContrastiveLoss()
    padded = loss_fn(images, texts, LOGIT_SCALE, mined_text_embeds=mined, mined_text_weights=mined_weights)
    padded.backward()
    assert torch.isfinite(padded)
    assert (mined.grad[:, 2] == 0).all()
    trimmed = loss_fn(
        images, texts, LOGIT_SCALE, mined_text_embeds=mined[:, :2].detach(), mined_text_weights=mined_weights[:, :2]
    )
    assert abs(padded.item() - trimmed.item()) < 1e-6


def test_a_mined_text_counts_like_an_in_batch_negative_in_the_image_direction():
    """Weight 2 on a mined text = the image->text denominator term 2 * exp(s)."""
    logits = _logits(4).detach()
    mined = torch.tensor([[0.5], [1.0], [-2.0], [3.0]])
    weights = torch.tensor([[2.0], [1.0], [0.5], [0.0]])
    loss = weighted_contrastive_loss(logits, mined_logits=mined, mined_weights=weights)
    image_rows = torch.logsumexp(torch.cat([logits, mined + weights.log()], dim=1), dim=1) - logits.diagonal()
    text_rows = torch.logsumexp(logits.T, dim=1) - logits.diagonal()
    assert abs(loss.item() - ((image_rows.mean() + text_rows.mean()) / 2).item()) < 1e-6


# --- extra positives -------------------------------------------------------------------------------------------


def test_positive_weights_are_soft_cross_entropy_targets():
    logits = _logits(4).detach()
    positives = torch.eye(4)
    positives[0, 2] = 1.0
    positives[3, 1] = 0.5
    expected = (
        F.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
        + F.cross_entropy(logits.T, positives.T / positives.T.sum(1, keepdim=True))
    ) / 2
    assert abs(weighted_contrastive_loss(logits, positive_weights=positives).item() - expected.item()) < 1e-6


def test_duplicates_as_mutual_positives_are_not_pushed_apart():
    images, texts = _embeds(batch=5)
    images[1], texts[1] = images[0], texts[0]  # item 1 duplicates item 0
    images.requires_grad_()
    texts.requires_grad_()

    def pair_gradient(positive_weights):
        logits = (F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T) * LOGIT_SCALE.exp()
        logits.retain_grad()
        weighted_contrastive_loss(logits, positive_weights=positive_weights).backward()
        return logits.grad[0, 1].item()

    positives = torch.eye(5)
    positives[0, 1] = positives[1, 0] = 1.0
    vanilla, mutual = pair_gradient(None), pair_gradient(positives)
    assert vanilla > 0  # vanilla CLIP lowers s_01: it pushes the duplicates apart
    assert mutual <= 0  # as mutual positives they are pulled together (or left alone at balance)


def test_extra_positive_ignores_its_negative_weight():
    positives = torch.eye(5)
    positives[2, 4] = 1.0
    masked = torch.ones(5, 5)
    masked[2, 4] = 0.0
    logits = _logits().detach()
    assert weighted_contrastive_loss(logits, masked, positives) == weighted_contrastive_loss(logits, None, positives)


# --- inputs, config, precision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"negative_weights": torch.ones(5, 5)}, r"negative_weights has shape \(5, 5\), expected \(6, 6\)"),
        ({"negative_weights": -torch.ones(6, 6)}, "negative values"),
        ({"negative_weights": torch.full((6, 6), float("nan"))}, "NaN"),
        ({"positive_weights": torch.zeros(6, 6)}, r"positive_weights\[0, 0\] must be > 0"),
        ({"mined_text_embeds": torch.ones(6, 2, 3)}, r"mined_text_embeds must have shape \(6, m, 8\)"),
        ({"mined_text_embeds": torch.ones(6, 2, 8), "mined_text_weights": torch.ones(6, 3)}, "mined_text_weights"),
        ({"mined_text_weights": torch.ones(6, 3)}, "without mined_text_embeds"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    images, texts = _embeds()
    with pytest.raises(ValueError, match=message):
        WeightedContrastiveLoss()(images, texts, LOGIT_SCALE, **kwargs)


def test_mismatched_embeddings_raise():
    images, _ = _embeds()
    with pytest.raises(ValueError, match="one paired text per image"):
        WeightedContrastiveLoss()(images, images[:4], LOGIT_SCALE)


def test_config_dict_and_logit_scale_clamp():
    loss_fn = WeightedContrastiveLoss(gather_across_processes=False, max_logit_scale=10.0)
    assert loss_fn.get_config_dict() == {"gather_across_processes": False, "max_logit_scale": 10.0}
    images, texts = _embeds()
    huge = torch.tensor(math.log(1000.0))
    assert loss_fn(images, texts, huge) == loss_fn(images, texts, torch.tensor(math.log(10.0)))
    with pytest.raises(ValueError, match="max_logit_scale"):
        WeightedContrastiveLoss(max_logit_scale=0.0)


def test_half_precision_embeddings_give_a_float32_loss():
    images, texts = _embeds()
    loss = WeightedContrastiveLoss()(images.bfloat16(), texts.bfloat16(), LOGIT_SCALE)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - _clip_loss(images, texts, LOGIT_SCALE).item()) < 0.05


def test_gather_is_a_no_op_without_distributed():
    images, texts = _embeds()
    gathered = gather_features(images, texts)
    assert gathered[0] is images and gathered[1] is texts
    (ids,) = gather_metadata(torch.tensor([3, 1]))
    assert ids.tolist() == [3, 1]
    with pytest.raises(ValueError, match="0-d"):
        gather_features(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        gather_metadata([1, 2])


# --- properties -------------------------------------------------------------------------------------------------
# Each holds for arbitrary batches: float32 and float64, with or without extra positives, masked and zero-weight
# (padding) mined texts. In float64 the tolerances are those of exact arithmetic up to rounding.

_cases = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 7),
        "dim": st.integers(1, 6),
        "seed": st.integers(0, 2**31 - 1),
        "mask_rate": st.floats(0.0, 1.0),
        "log_scale": st.floats(-2.0, math.log(100.0)),
        "double": st.booleans(),
        "with_positives": st.booleans(),
    }
)


def _random_case(batch, dim, seed, mask_rate, log_scale, double, with_positives):
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    images = torch.randn(batch, dim, generator=generator, dtype=dtype) * 10
    texts = torch.randn(batch, dim, generator=generator, dtype=dtype) * 10
    weights = torch.rand(batch, batch, generator=generator, dtype=dtype) * 3
    weights[torch.rand(batch, batch, generator=generator) < mask_rate] = 0.0
    positives = torch.eye(batch, dtype=dtype) + (torch.rand(batch, batch, generator=generator) < 0.2).to(dtype)
    mined = torch.randn(batch, 2, dim, generator=generator, dtype=dtype)
    mined_weights = torch.rand(batch, 2, generator=generator, dtype=dtype) * 3
    mined_weights[torch.rand(batch, 2, generator=generator) < 0.5] = 0.0  # padding
    scale = torch.tensor(log_scale, dtype=dtype)
    return images, texts, weights, positives if with_positives else None, mined, mined_weights, scale


def _float64_logits(case):
    """Raw float64 in-batch and mined logits of the case's size at its logit scale (up to 100): the loss
    function itself, on logits no cosine bounds, in exact arithmetic up to float64 rounding."""
    generator = torch.Generator().manual_seed(case["seed"])
    scale, batch = math.exp(case["log_scale"]), case["batch"]
    return (scale * torch.randn(batch, batch, generator=generator, dtype=torch.float64),
            scale * torch.randn(batch, 2, generator=generator, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(_cases)
def test_property_finite_loss_and_gradients(case):
    images, texts, weights, positives, mined, mined_weights, scale = _random_case(**case)
    images.requires_grad_()
    texts.requires_grad_()
    mined.requires_grad_()
    loss = WeightedContrastiveLoss()(images, texts, scale, weights, positives, mined, mined_weights)
    loss.backward()
    assert torch.isfinite(loss) and loss >= -1e-5  # the positive is always in each denominator
    for tensor in (images, texts, mined):
        assert torch.isfinite(tensor.grad).all()
    if case["double"]:
        logits, mined_logits = (t.requires_grad_() for t in _float64_logits(case))
        exact = weighted_contrastive_loss(logits, weights, positives, mined_logits, mined_weights)
        exact.backward()
        assert torch.isfinite(exact) and exact >= -1e-9
        assert torch.isfinite(logits.grad).all() and torch.isfinite(mined_logits.grad).all()


@settings(max_examples=60, deadline=None)
@given(_cases)
def test_property_symmetric_under_swapping_modalities(case):
    images, texts, weights, positives, _, _, scale = _random_case(**case)
    loss_fn = WeightedContrastiveLoss()
    forward = loss_fn(images, texts, scale, weights, positives)
    swapped = loss_fn(texts, images, scale, weights.T.contiguous(), None if positives is None else positives.T.contiguous())
    assert abs(forward.item() - swapped.item()) <= 1e-5 * max(1.0, abs(forward.item()))
    if case["double"]:
        logits, _ = _float64_logits(case)
        transposed = None if positives is None else positives.T.contiguous()
        torch.testing.assert_close(
            weighted_contrastive_loss(logits, weights, positives),
            weighted_contrastive_loss(logits.T.contiguous(), weights.T.contiguous(), transposed),
            rtol=1e-10, atol=1e-10,
        )


@settings(max_examples=60, deadline=None)
@given(_cases)
def test_property_masked_pairs_get_zero_gradient(case):
    images, texts, weights, positives, mined, mined_weights, scale = _random_case(**case)
    logits = ((F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T) * scale.exp()).requires_grad_()
    mined_logits = torch.randn(mined_weights.shape, dtype=logits.dtype).requires_grad_()
    mined_weights[:, 0] = 0.0
    weighted_contrastive_loss(logits, weights, positives, mined_logits, mined_weights).backward()
    off_diagonal = ~torch.eye(logits.shape[0], dtype=torch.bool)
    masked = (weights == 0) & (off_diagonal if positives is None else positives == 0)
    assert (logits.grad[masked] == 0).all()
    assert (mined_logits.grad[:, 0] == 0).all()
    assert (mined_logits.grad[mined_weights == 0] == 0).all()
    assert torch.isfinite(logits.grad).all()
