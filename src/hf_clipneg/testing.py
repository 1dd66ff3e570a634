"""Tiny random towers built from configs, for tests, smoke runs and examples that must run offline."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderProcessor,
)

from .modeling import ClipNegDualEncoderModel

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = (
    "a an the of with and on in small large tiny big red green blue yellow purple orange white black "
    "grey pink brown circle square triangle star cross ring striped dotted plain checked left right top "
    "bottom centre photo image shirt jeans dress shoe bag watch men women navy casual party"
).split()


def build_tiny_tokenizer(extra_words: list[str] | None = None) -> BertTokenizerFast:
    """Return a word-level BERT tokenizer over a small fixed English vocabulary.

    Example:
        >>> tok = build_tiny_tokenizer()
        >>> tok("a red circle")["input_ids"]
        [2, 5, 17, 28, 3]
    """
    vocab = _SPECIAL_TOKENS + _WORDS + list(extra_words or [])
    vocab += list("abcdefghijklmnopqrstuvwxyz0123456789")
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(dict.fromkeys(vocab))}, do_lower_case=True)


def build_tiny_dual_encoder(
    projection_dim: int = 16, image_size: int = 32, hidden_size: int = 32, seed: int = 0
) -> tuple[ClipNegDualEncoderModel, VisionTextDualEncoderProcessor]:
    """Build a randomly initialised ViT + BERT dual encoder small enough for unit tests (mean text pooling,
    captions cut at 64 tokens).

    Example:
        >>> model, processor = build_tiny_dual_encoder()
        >>> model.config.projection_dim
        16
    """
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    vision_config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
    )
    text_config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
    )
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_config, text_config, projection_dim=projection_dim
    )
    config.text_pooling = "mean"
    config.text_max_length = 64
    model = ClipNegDualEncoderModel(
        config=config, vision_model=ViTModel(vision_config, add_pooling_layer=True), text_model=BertModel(text_config)
    )
    image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor
