"""Contrastive losses for dual encoders, and the one cross-process gather they all use."""

from .gather import gather_features, gather_metadata, is_distributed
from .weighted_contrastive import WeightedContrastiveLoss, weighted_contrastive_loss

__all__ = [
    "WeightedContrastiveLoss",
    "gather_features",
    "gather_metadata",
    "is_distributed",
    "weighted_contrastive_loss",
]
