"""SigmoidContrastiveLoss (SigLIP): the paper's formula, masked pairs, extra positives, mined negatives, bad inputs,
and the 2-process gather."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_clipneg.losses import (
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    SigmoidContrastiveLoss,
    sigmoid_contrastive_loss,
)

SCRIPT = Path(__file__).parent / "scripts" / "sigmoid_gather.py"
TOLERANCE = 1e-5


def _embeds(batch: int = 6, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, dim, generator=generator, requires_grad=True)
    texts = torch.randn(batch, dim, generator=generator, requires_grad=True)
    return images, texts


def _paper_loss(images, texts, t_prime, b, labels=None):
    """Zhai et al. 2023, Algorithm 1, written out: logits = dot(zimg, ztxt.T) * t + b, labels = 2 eye(n) - ones(n),
    l = -sum(log_sigmoid(labels * logits)) / n."""
    n = images.shape[0]
    zimg = images / images.norm(dim=-1, keepdim=True)
    ztxt = texts / texts.norm(dim=-1, keepdim=True)
    logits = zimg @ ztxt.T * t_prime.exp() + b
    if labels is None:
        labels = 2 * torch.eye(n) - torch.ones(n, n)
    return -torch.sum(F.logsigmoid(labels * logits)) / n


def _loss_and_grads(loss_fn, images, texts, t_prime, **kwargs):
    loss = loss_fn(images, texts, t_prime, **kwargs)
    return loss, torch.autograd.grad(loss, (images, texts, t_prime, loss_fn.logit_bias))


# --- the paper's formula ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "batch", "t_prime", "bias"),
                         [(0, 6, math.log(10.0), -10.0), (1, 9, 2.0, -3.0), (2, 16, 0.5, 1.5)])
@pytest.mark.parametrize("explicit_weights", [False, True])
def test_all_ones_weights_equal_the_paper_formula(seed, batch, t_prime, bias, explicit_weights):
    images, texts = _embeds(batch, seed=seed)
    scale = torch.tensor(t_prime, requires_grad=True)
    loss_fn = SigmoidContrastiveLoss(init_logit_bias=bias)
    kwargs = {"negative_weights": torch.ones(batch, batch), "positive_weights": torch.eye(batch)} if explicit_weights else {}
    ours, ours_grads = _loss_and_grads(loss_fn, images, texts, scale, **kwargs)
    bias_leaf = torch.tensor(bias, requires_grad=True)
    paper = _paper_loss(images, texts, scale, bias_leaf)
    paper_grads = torch.autograd.grad(paper, (images, texts, scale, bias_leaf))
    assert ours.dtype == torch.float32
    assert abs(ours.item() - paper.item()) <= 1e-6 * max(1.0, abs(paper.item()))
    for mine, reference in zip(ours_grads, paper_grads):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)


def test_siglip_initialisation_and_config():
    loss_fn = SigmoidContrastiveLoss()
    assert SIGLIP_INIT_LOGIT_SCALE == math.log(10.0) and SIGLIP_INIT_LOGIT_BIAS == -10.0
    assert loss_fn.logit_bias.item() == -10.0 and loss_fn.logit_bias.requires_grad
    assert [name for name, _ in loss_fn.named_parameters()] == ["logit_bias"]
    assert loss_fn.get_config_dict() == {"gather_across_processes": True, "init_logit_bias": -10.0}
    assert SigmoidContrastiveLoss(gather_across_processes=False, init_logit_bias=-4).get_config_dict() == {
        "gather_across_processes": False, "init_logit_bias": -4.0}
    assert "@inproceedings" in loss_fn.citation and "Sigmoid Loss for Language Image Pre-Training" in loss_fn.citation
    assert "init_logit_bias=-10.0" in repr(loss_fn)
    with pytest.raises(ValueError, match="init_logit_bias"):
        SigmoidContrastiveLoss(init_logit_bias=float("nan"))


def test_logit_bias_argument_overrides_the_parameter_and_floats_work():
    images, texts = _embeds()
    loss_fn = SigmoidContrastiveLoss()
    fixed = loss_fn(images, texts, 1.0, logit_bias=-2.0)
    expected = _paper_loss(images, texts, torch.tensor(1.0), torch.tensor(-2.0))
    assert abs(fixed.item() - expected.item()) < 1e-6


def test_half_precision_embeddings_give_a_float32_loss():
    images, texts = _embeds()
    scale = torch.tensor(SIGLIP_INIT_LOGIT_SCALE)
    loss_fn = SigmoidContrastiveLoss()
    loss = loss_fn(images.bfloat16(), texts.bfloat16(), scale)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - loss_fn(images, texts, scale).item()) < 0.05 * loss.item()


# --- masked pairs -------------------------------------------------------------------------------------------------


def test_masked_pairs_get_exactly_zero_gradient_on_their_logits():
    logits = (torch.randn(5, 5, generator=torch.Generator().manual_seed(3)) * 4).requires_grad_()
    weights = torch.ones(5, 5)
    masked = [(0, 1), (1, 0), (2, 4), (4, 3)]
    for i, j in masked:
        weights[i, j] = 0.0
    loss = sigmoid_contrastive_loss(logits, negative_weights=weights)
    (grad,) = torch.autograd.grad(loss, logits)
    for i, j in masked:
        assert grad[i, j].item() == 0.0
    # every other pair (and the mask, were it ignored) has a clearly non-zero gradient
    assert (grad[weights > 0].abs() > 1e-4).all()
    # and the loss is the paper's sum over the remaining pairs only
    labels = 2 * torch.eye(5) - 1
    expected = -(F.logsigmoid(labels * logits) * weights).sum() / 5
    assert abs(loss.item() - expected.item()) < 1e-6


def test_a_masked_pair_leaves_the_image_gradient_independent_of_that_text():
    """Image 0 meets text 1 only in pair (0, 1): with that pair masked, changing text 1 leaves image 0's gradient
    bit for bit unchanged; without the mask it changes (the control that the test sees the mask)."""
    loss_fn = SigmoidContrastiveLoss(gather_across_processes=False, init_logit_bias=-1.0)
    scale = torch.tensor(2.0)
    weights = torch.ones(6, 6)
    weights[0, 1] = 0.0

    def image_zero_grad(text_one_seed: int, negative_weights):
        images, texts = _embeds()
        texts = texts.detach().clone()
        texts[1] = torch.randn(8, generator=torch.Generator().manual_seed(text_one_seed)) * 3
        loss = loss_fn(images, texts, scale, negative_weights=negative_weights)
        return torch.autograd.grad(loss, images)[0][0]

    torch.testing.assert_close(image_zero_grad(10, weights), image_zero_grad(11, weights), atol=0, rtol=0)
    assert (image_zero_grad(10, None) - image_zero_grad(11, None)).abs().max() > 1e-3


def test_weights_scale_the_negative_terms():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 3
    weights = torch.rand(4, 4, generator=torch.Generator().manual_seed(6)) * 3
    labels = 2 * torch.eye(4) - 1
    terms = -F.logsigmoid(labels * logits)
    expected = (torch.where(torch.eye(4) > 0, terms, weights * terms)).sum() / 4
    torch.testing.assert_close(sigmoid_contrastive_loss(logits, negative_weights=weights), expected)


# --- extra positives ------------------------------------------------------------------------------------------------


def test_an_extra_positive_counts_as_a_positive():
    images, texts = _embeds()
    scale = torch.tensor(1.5)
    loss_fn = SigmoidContrastiveLoss(init_logit_bias=-2.0)
    positives = torch.eye(6)
    positives[2, 4] = 1.0
    negatives = torch.ones(6, 6)
    negatives[2, 4] = 0.0  # a negative weight on a positive pair is ignored
    labels = 2 * torch.eye(6) - 1
    labels[2, 4] = 1.0
    expected = _paper_loss(images, texts, scale, torch.tensor(-2.0), labels=labels)
    for kwargs in ({"positive_weights": positives}, {"positive_weights": positives, "negative_weights": negatives}):
        got = loss_fn(images, texts, scale, **kwargs)
        assert abs(got.item() - expected.item()) < 1e-6
    assert abs(loss_fn(images, texts, scale).item() - expected.item()) > 1e-3


def test_positive_weights_scale_the_positive_terms():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(7)) * 3
    positives = torch.eye(4) * 2.0
    positives[0, 3] = 0.5
    labels = torch.where(positives > 0, 1.0, -1.0)
    terms = -F.logsigmoid(labels * logits)
    expected = (torch.where(positives > 0, positives, torch.ones(4, 4)) * terms).sum() / 4
    torch.testing.assert_close(sigmoid_contrastive_loss(logits, positive_weights=positives), expected)


# --- mined negatives ------------------------------------------------------------------------------------------------


def test_mined_negatives_are_extra_weighted_negatives_and_padding_gets_zero_gradient():
    images, texts = _embeds(4)
    mined = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9), requires_grad=True)
    mined_weights = torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.3, 1.0, 0.0]])
    scale, bias = torch.tensor(2.0), -1.0
    loss_fn = SigmoidContrastiveLoss(init_logit_bias=bias)
    loss = loss_fn(images, texts, scale, mined_text_embeds=mined, mined_text_weights=mined_weights)

    zimg = images / images.norm(dim=-1, keepdim=True)
    zmined = mined / mined.norm(dim=-1, keepdim=True)
    mined_logits = torch.einsum("bd,bmd->bm", zimg, zmined) * scale.exp() + bias
    in_batch = _paper_loss(images, texts, scale, torch.tensor(bias))
    expected = in_batch + (mined_weights * -F.logsigmoid(-mined_logits)).sum() / 4
    assert abs(loss.item() - expected.item()) < 1e-6

    (grad,) = torch.autograd.grad(loss, mined)
    padding = mined_weights == 0
    assert (grad[padding] == 0).all()
    assert (grad[~padding].abs().amax(dim=-1) > 1e-6).all()
    # all-ones weights by default; no mined texts at all equals the in-batch loss
    ones = loss_fn(images, texts, scale, mined_text_embeds=mined)
    torch.testing.assert_close(ones, loss_fn(images, texts, scale, mined_text_embeds=mined,
                                             mined_text_weights=torch.ones(4, 3)))
    assert abs(loss_fn(images, texts, scale).item() - in_batch.item()) < 1e-6


# --- bad inputs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"negative_weights": torch.ones(5, 5)}, r"negative_weights has shape \(5, 5\), expected \(6, 6\)"),
        ({"negative_weights": -torch.ones(6, 6)}, "negative_weights contains negative values"),
        ({"negative_weights": torch.full((6, 6), float("nan"))}, "negative_weights contains NaN"),
        ({"positive_weights": torch.eye(6) * float("nan")}, "positive_weights contains NaN"),
        ({"positive_weights": torch.zeros(6, 6)}, r"positive_weights\[0, 0\] must be > 0"),
        ({"positive_weights": torch.eye(7)}, r"positive_weights has shape \(7, 7\), expected \(6, 6\)"),
        ({"mined_text_embeds": torch.ones(6, 2, 3)}, r"mined_text_embeds must have shape \(6, m, 8\)"),
        ({"mined_text_embeds": torch.ones(6, 2, 8), "mined_text_weights": torch.ones(6, 3)}, "mined_text_weights"),
        ({"mined_text_embeds": torch.ones(6, 2, 8), "mined_text_weights": torch.full((6, 2), float("inf"))},
         "mined_weights contains NaN or inf"),
        ({"mined_text_weights": torch.ones(6, 3)}, "without mined_text_embeds"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    images, texts = _embeds()
    with pytest.raises(ValueError, match=message):
        SigmoidContrastiveLoss()(images, texts, torch.tensor(1.0), **kwargs)


def test_bad_embeddings_and_logits_raise():
    images, _ = _embeds()
    with pytest.raises(ValueError, match="one paired text per image"):
        SigmoidContrastiveLoss()(images, images[:4], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"must be \(batch, dim\)"):
        SigmoidContrastiveLoss()(images[0], images[0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="logits_per_image must be square"):
        sigmoid_contrastive_loss(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"mined_logits must have shape \(3, m\)"):
        sigmoid_contrastive_loss(torch.ones(3, 3), mined_logits=torch.ones(2, 2))
    with pytest.raises(ValueError, match="mined_weights was given without mined_logits"):
        sigmoid_contrastive_loss(torch.ones(3, 3), mined_weights=torch.ones(3, 2))
    with pytest.raises(TypeError, match="negative_weights must be a torch.Tensor"):
        sigmoid_contrastive_loss(torch.ones(3, 3), negative_weights=[[1.0] * 3] * 3)


# --- two processes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    """tests/scripts/sigmoid_gather.py under `accelerate launch` on 2 CPU processes, as test_gather_distributed.py
    runs distributed_gather.py."""
    from test_gather_distributed import _clean_env, _free_port

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    out = tmp_path_factory.mktemp("sigmoid_gather")
    launch = "launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
    command = [accelerate, *launch.split(), "--main_process_port", str(_free_port()), str(SCRIPT), str(out)]
    done = subprocess.run(command, env=_clean_env(out / "hf_home"), capture_output=True, text=True, timeout=180,
                          cwd=SCRIPT.parents[2])
    assert done.returncode == 0, f"2-process run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def one_process_reference() -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    sys.path.insert(0, str(SCRIPT.parent))
    import sigmoid_gather as script

    model, loss_fn = script.TinyDualEncoder(), script.make_loss()
    return {case["name"]: script.sigmoid_loss_and_grads(model, loss_fn, case) for case in script.make_cases()}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vanilla", "weighted"])
def test_two_processes_equal_one_process_on_the_global_batch(two_process_results, one_process_reference, case):
    expected_loss, expected_grads = one_process_reference[case]
    assert "logit_bias" in expected_grads
    too_small = [name for name, grad in expected_grads.items() if grad.abs().max() <= 1e-3]
    assert not too_small, f"reference gradients too small to compare: {too_small}"
    for rank, result in enumerate(two_process_results):
        assert result["rank"] == rank and result["wrapper"] == "DistributedDataParallel"
        got = result["cases"][case]
        assert got["loss"] == pytest.approx(expected_loss, rel=TOLERANCE, abs=TOLERANCE)
        torch.testing.assert_close(got["grads"], expected_grads, atol=TOLERANCE, rtol=0)  # same keys, every tensor


@pytest.mark.slow
def test_two_processes_without_gather_differ_and_local_weights_are_refused(two_process_results, one_process_reference):
    _, expected_grads = one_process_reference["vanilla"]
    local = two_process_results[0]["cases"]["vanilla_local_only"]
    assert max((local["grads"][name] - grad).abs().max().item() for name, grad in expected_grads.items()) > 1e-2
    for result in two_process_results:
        message = result["local_weights_error"]
        assert "(4, 4), expected (8, 8)" in message and "GLOBAL" in message
