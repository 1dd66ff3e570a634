"""Contrastive losses for dual encoders, and the one cross-process gather they all use."""

from .gather import gather_features, gather_metadata, is_distributed
from .sigmoid import (
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    SigmoidContrastiveLoss,
    sigmoid_contrastive_loss,
)
from .weighted_contrastive import WeightedContrastiveLoss, weighted_contrastive_loss

__all__ = [
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOGIT_SCALE",
    "SigmoidContrastiveLoss",
    "WeightedContrastiveLoss",
    "gather_features",
    "gather_metadata",
    "is_distributed",
    "sigmoid_contrastive_loss",
    "weighted_contrastive_loss",
]
