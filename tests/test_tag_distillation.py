"""Tests for text-tag self-distillation (TTD): tag extraction, tag selection, the distillation loss,
dense image embeddings and the single-tag bias measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from hf_clipneg.losses import WeightedContrastiveLoss
from hf_clipneg.losses.tag_bias import single_tag_bias, single_tag_bias_from_embeddings
from hf_clipneg.losses.tag_distillation import (
    TagSelfDistillationLoss,
    dense_image_embeddings,
    select_tags,
    similarity_maps,
    tag_grounding_scores,
    ttd_loss_term,
)
from hf_clipneg.tags import ENGLISH_STOPWORDS, extract_tags, extract_tags_batch, tag_token_batch
from hf_clipneg.testing import build_tiny_dual_encoder, build_tiny_tokenizer

# ------------------------------------------------------------------------------------------- tags


def test_extract_tags_product_title() -> None:
    tags = extract_tags("Peter England Men Party Blue Jeans")
    assert {"blue", "jeans", "party"} <= set(tags)
    assert "blue jeans" in tags or len(tags) == 8
    tags = extract_tags("Nike Men's Black Running Shoes with a Mesh Upper for the Gym", max_tags=20)
    assert {"nike", "men", "black", "running", "shoes", "mesh", "upper", "gym"} <= set(tags)
    assert not set(tags) & {"with", "a", "for", "the", "s", "men's"}
    assert "running shoes" in tags and "shoes mesh" not in tags  # "with a" breaks the phrase


def test_extract_tags_order_dedupe_numbers_and_limits() -> None:
    assert extract_tags("Pack of 3 red socks, RED socks 2024", phrases=False) == ["red", "socks"]
    assert extract_tags("Blue blue t-shirt", phrases=True) == ["blue", "t-shirt", "blue t-shirt"]
    assert extract_tags("one two three", phrases=True) == []
    assert len(extract_tags("a b c dd ee ff gg hh ii jj kk", max_tags=3)) == 3
    assert extract_tags("the red dress", stopwords=["red"], phrases=False) == ["the", "dress"]
    assert "the" in ENGLISH_STOPWORDS
    with pytest.raises(TypeError, match="string"):
        extract_tags(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tags"):
        extract_tags("red", max_tags=0)


def test_extract_tags_batch_names_bad_row() -> None:
    assert extract_tags_batch(["red dress", "blue bag"], phrases=False) == [["red", "dress"], ["blue", "bag"]]
    with pytest.raises(TypeError, match="row 1"):
        extract_tags_batch(["red dress", float("nan")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of captions"):
        extract_tags_batch("red dress")  # type: ignore[arg-type]


def test_tag_token_batch_shapes_mask_and_given_tags() -> None:
    tokenizer = build_tiny_tokenizer()
    batch = tag_token_batch(tokenizer, ["red shirt on the left", "a circle", "the of"], max_tags=4, phrases=False)
    assert batch["tag_mask"].tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert batch["tag_input_ids"].shape[0] == 9 and batch["tag_attention_mask"].shape == batch["tag_input_ids"].shape
    # row i * T + t is tag t of caption i: the second slot of caption 0 is "shirt"
    assert tokenizer.decode(batch["tag_input_ids"][1], skip_special_tokens=True) == "shirt"
    given = tag_token_batch(tokenizer, ["ignored", "ignored"], tags=[["navy dress"], ["bag", "watch", "ring"]], max_tags=2)
    assert given["tag_mask"].tolist() == [[True, False], [True, True]]
    assert tokenizer.decode(given["tag_input_ids"][0], skip_special_tokens=True) == "navy dress"
    with pytest.raises(ValueError, match="row 1"):
        tag_token_batch(tokenizer, ["a", "b"], tags=[["red"], [""]])
    with pytest.raises(ValueError, match="one list of tags per caption"):
        tag_token_batch(tokenizer, ["a", "b"], tags=[["red"]])


# ---------------------------------------------------------------------------------- synthetic scene

CONCEPTS = 8  # orthonormal concept directions: "red", "circle", "blue", ...


def scene(present: list[list[int]], patches: int = 6, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """(B, P, CONCEPTS) patch embeddings: image i's patches show its present concepts, the rest background."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(present), patches, CONCEPTS)
    background = CONCEPTS - 1
    for i, concepts in enumerate(present):
        for p in range(patches):
            out[i, p, concepts[p] if p < len(concepts) else background] = 1.0
    return F.normalize(out + noise * torch.randn(out.shape, generator=gen), dim=-1)


def concept(*indices: int) -> torch.Tensor:
    vec = torch.zeros(CONCEPTS)
    vec[list(indices)] = 1.0
    return F.normalize(vec, dim=0)


def test_selected_tags_are_those_in_the_image() -> None:
    present = [[0, 1], [2, 3], [0, 4], [5, 3]]
    patches = scene(present)
    # each caption mentions its two present concepts and one absent one (present in some other image)
    tag_ids = [[0, 1, 2], [2, 3, 4], [4, 0, 5], [5, 1, 3]]
    tags = torch.stack([torch.stack([concept(t) for t in row]) for row in tag_ids])
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[3, 2] = False  # padding slot: never selected although concept 3 is in image 3
    selected = select_tags(patches, tags, mask)
    expected = [[t in present[i] for t in row] for i, row in enumerate(tag_ids)]
    expected[3][2] = False
    assert selected.tolist() == expected
    scores = tag_grounding_scores(patches, tags, mask)
    assert torch.isinf(scores[3, 2]) and scores[0, 0] > 0.5 and scores[0, 2] < 0


def test_select_tags_keeps_at_least_one_and_single_image_batch() -> None:
    patches = scene([[0, 1], [0, 1]])  # identical images: no tag beats the other image
    tags = torch.stack([concept(0), concept(1)])[None].repeat(2, 1, 1)
    selected = select_tags(patches, tags, torch.ones(2, 2, dtype=torch.bool), margin=0.5)
    assert selected.sum(dim=1).tolist() == [1, 1]
    one = select_tags(patches[:1], torch.stack([concept(0), concept(6)])[None], torch.ones(1, 2, dtype=torch.bool))
    assert one.tolist() == [[True, False]]
    with pytest.raises(TypeError, match="bool"):
        select_tags(patches, tags, torch.ones(2, 2))


# ------------------------------------------------------------------------------------------- loss


def two_tag_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    present = [[0, 1], [2, 3], [4, 5], [1, 2]]
    patches = scene(present, noise=0.0)
    tags = torch.stack([torch.stack([concept(a), concept(b)]) for a, b in present])
    return patches, tags, torch.ones(4, 2, dtype=torch.bool)


@pytest.mark.parametrize("mode", ["kl", "mse"])
def test_loss_is_zero_when_caption_map_equals_tag_union(mode: str) -> None:
    patches, tags, mask = two_tag_batch()
    # caption = both tags: its map is 1/sqrt(2) on both tag regions, 0 elsewhere -> same shape as the union
    caption = torch.stack([concept(0, 1), concept(2, 3), concept(4, 5), concept(1, 2)])
    loss = TagSelfDistillationLoss(mode=mode)(patches, caption, tags, mask)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    # a caption that follows one tag only is penalised
    biased = tags[:, 0]
    assert float(TagSelfDistillationLoss(mode=mode)(patches, biased, tags, mask)) > 0.05


def test_optimising_the_caption_moves_its_map_to_the_union() -> None:
    patches, tags, mask = two_tag_batch()
    loss_fn = TagSelfDistillationLoss()
    caption = (tags[:, 0] + 0.05 * torch.randn(4, CONCEPTS, generator=torch.Generator().manual_seed(1))).clone()
    caption.requires_grad_(True)
    teacher = tags.clone().requires_grad_(True)
    union, selected = loss_fn.teacher_maps(patches, teacher, mask)
    assert selected.all()

    def distance() -> float:
        with torch.no_grad():
            student = similarity_maps(patches, caption)
            return float(sum(1 - torch.corrcoef(torch.stack([s, u]))[0, 1] for s, u in zip(student, union)))

    before, loss_before = distance(), float(loss_fn(patches, caption, teacher, mask).detach())
    optimizer = torch.optim.SGD([caption], lr=0.5)
    loss = loss_fn(patches, caption, teacher, mask)
    optimizer.zero_grad()
    loss.backward()
    assert teacher.grad is None  # the tag side is a detached teacher
    optimizer.step()
    assert distance() < before
    assert float(loss_fn(patches, caption, teacher, mask).detach()) < loss_before


def test_loss_gradient_reaches_patches_unless_detached_and_min_tags() -> None:
    patches, tags, mask = two_tag_batch()
    patches = patches.clone().requires_grad_(True)
    TagSelfDistillationLoss()(patches, tags[:, 0], tags, mask).backward()
    assert patches.grad is not None and patches.grad.abs().sum() > 0
    patches.grad = None
    caption = tags[:, 0].clone().requires_grad_(True)
    TagSelfDistillationLoss(detach_image=True)(patches, caption, tags, mask).backward()
    assert patches.grad is None and caption.grad is not None
    # one valid tag per caption and min_tags=2: no term, but a graph for backward
    single = mask.clone()
    single[:, 1] = False
    zero = TagSelfDistillationLoss(min_tags=2)(patches, caption, tags, single)
    assert zero.item() == 0.0 and zero.requires_grad
    assert TagSelfDistillationLoss(temperature=0.2, mode="mse").get_config_dict() == {
        "temperature": 0.2, "margin": 0.0, "min_tags": 2, "mode": "mse", "detach_image": False
    }
    with pytest.raises(ValueError, match="temperature"):
        TagSelfDistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="caption_embeds"):
        TagSelfDistillationLoss()(patches, caption[:2], tags, mask)


# ------------------------------------------------------------------------------ dense embeddings


def _replace_patches_with_cls(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, :1].expand_as(hidden).clone()


def test_dense_embeddings_vit_match_pooled_path() -> None:
    model, _ = build_tiny_dual_encoder(projection_dim=16, image_size=32)
    model.eval()
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.randn(2, 3, 32, 32))
        dense = dense_image_embeddings(model, out.last_hidden_state)
        assert dense.shape == (2, 16, 16)  # 32/8 = 4x4 patches, CLS dropped
        assert torch.allclose(dense.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
        # a "patch" equal to the CLS token gets exactly the pooled image embedding (pooler applied per patch)
        same = dense_image_embeddings(model, _replace_patches_with_cls(out.last_hidden_state))
        pooled = F.normalize(model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output, dim=-1)
        assert pooled.shape == (1, 16)
        expected = F.normalize(model.visual_projection(out.pooler_output), dim=-1)
        assert torch.allclose(same, expected[:, None].expand_as(same), atol=1e-5)


def test_dense_embeddings_clip_vision_applies_post_layernorm() -> None:
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    text = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)).eval()
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.randn(2, 3, 32, 32))
        same = dense_image_embeddings(model, _replace_patches_with_cls(out.last_hidden_state))
        expected = F.normalize(model.visual_projection(out.pooler_output), dim=-1)
    assert same.shape == (2, 16, 16)
    assert torch.allclose(same, expected[:, None].expand_as(same), atol=1e-5)


def test_dense_embeddings_efficientnet_layout() -> None:
    class FakeDualEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_model = nn.Identity()
            self.visual_projection = nn.Linear(1280, 24, bias=False)

    model = FakeDualEncoder()
    hidden = torch.randn(3, 1280, 7, 7)
    dense = dense_image_embeddings(model, hidden)
    assert dense.shape == (3, 49, 24)
    assert torch.allclose(dense.norm(dim=-1), torch.ones(3, 49), atol=1e-5)
    # location (row 2, column 5) is flattened to index 2 * 7 + 5
    expected = F.normalize(model.visual_projection(hidden[:, :, 2, 5]), dim=-1)
    assert torch.allclose(dense[:, 19], expected, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        dense_image_embeddings(model, torch.randn(3, 640, 7, 7))
    with pytest.raises(ValueError, match="shape"):
        dense_image_embeddings(model, torch.randn(3, 1280))


# ---------------------------------------------------------------------------------- training


def _shape_images() -> tuple[list[Image.Image], list[str]]:
    colours = ["red", "blue", "green", "yellow", "white", "purple"]
    images, captions = [], []
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (32, 32), "black")
        draw = ImageDraw.Draw(image)
        if i % 2:
            draw.ellipse((4, 4, 20, 20), fill=colour)
            captions.append(f"a {colour} circle on the left")
        else:
            draw.rectangle((12, 12, 30, 30), fill=colour)
            captions.append(f"a {colour} square on the right")
        images.append(image)
    return images, captions


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and much faster when other processes load the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_training_with_ttd_term_is_stable(one_thread: None) -> None:
    model, processor = build_tiny_dual_encoder(projection_dim=16, image_size=32, seed=0)
    model.train()
    images, captions = _shape_images()
    batch = processor(text=captions, images=images, return_tensors="pt", padding=True)
    tag_batch = tag_token_batch(processor.tokenizer, captions, max_tags=4)
    assert tag_batch["tag_mask"].sum(dim=1).min() >= 2
    contrastive = WeightedContrastiveLoss()
    ttd = TagSelfDistillationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    history = []
    for _ in range(12):
        outputs = model(**batch, return_dict=True)
        clip = contrastive(outputs.image_embeds, outputs.text_embeds, model.logit_scale)
        term = ttd_loss_term(model, outputs, outputs.text_embeds, tag_batch, ttd)
        loss = clip + 1.0 * term
        assert torch.isfinite(clip) and torch.isfinite(term)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        history.append(clip.item())
    assert history[-1] < history[0]
    with pytest.raises(KeyError, match="tag_attention_mask"):
        ttd_loss_term(model, outputs, outputs.text_embeds, {"tag_input_ids": tag_batch["tag_input_ids"]})


# ------------------------------------------------------------------------------------- bias measure


def test_single_tag_bias_from_embeddings_separates_biased_captions() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(300, 16))
    tags = rng.normal(size=(20, 3, 16))
    mask = np.ones((20, 3), dtype=bool)
    biased = single_tag_bias_from_embeddings(images, tags[:, 1], tags, mask)
    balanced = single_tag_bias_from_embeddings(images, tags.sum(axis=1), tags, mask)
    assert biased["single_tag_bias"] == pytest.approx(1.0, abs=1e-6) and biased["single_tag_share"] == 1.0
    assert balanced["single_tag_bias"] < 0.7 and balanced["single_tag_share"] == 0.0
    assert balanced["all_tags_r2"] > 0.9 and biased["num_captions"] == 20
    mask[:5, 1:] = False  # one tag only: skipped and counted
    assert single_tag_bias_from_embeddings(images, tags[:, 0], tags, mask)["skipped"] == 5
    with pytest.raises(TypeError, match="boolean"):
        single_tag_bias_from_embeddings(images, tags[:, 0], tags, mask.astype(float))


def test_single_tag_bias_with_model() -> None:
    model, processor = build_tiny_dual_encoder()
    images, captions = _shape_images()
    report = single_tag_bias(model, processor, images * 3, captions)
    assert report["num_captions"] + report["skipped"] == len(captions)
    assert 0.0 <= report["single_tag_bias"] <= 1.0
