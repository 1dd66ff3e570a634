"""hf_clipneg: train CLIP-style image-text retrieval models without false negatives.

The pipeline: `load_pairs` -> `mine_negatives` (cluster ids, mined negatives, weights as a datasets step)
-> `ClipNegTrainer` (weighted contrastive loss under Accelerate) -> `ClipNegRetriever` (faiss search).
Heavy modules load on first use, so `import hf_clipneg` stays fast.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "load_pairs": "data",
    "check_images": "data",
    "make_synthetic_pairs": "data",
    "make_synthetic_splits": "data",
    "build_dual_encoder": "towers",
    "convert_efficientnet_lite0": "towers",
    "packaged_vision_tower": "towers",
    "packaged_text_tower": "towers",
    "compute_features": "features",
    "spherical_kmeans": "clustering",
    "cluster_features": "clustering",
    "MiningConfig": "mining",
    "MiningStats": "mining",
    "NegativeStrategy": "mining",
    "DuplicateEvidence": "mining",
    "DuplicateAction": "mining",
    "NegativeMiner": "mining",
    "mine_negatives": "mining",
    "pair_weights": "mining",
    "WeightedContrastiveLoss": "losses",
    "gather_features": "losses",
    "ClipNegCollator": "training",
    "ClipNegTrainingArguments": "training",
    "ClipNegTrainer": "training",
    "retrieval_metrics": "metrics",
    "load_retrieval_metric": "metrics",
    "ClipNegRetriever": "retrieval",
    "push_mined_dataset": "hub",
    "load_mined_dataset": "hub",
    "push_model": "hub",
    "render_model_card": "hub",
    "modality_gap": "tldr",
    "ImageSpaceProjector": "tldr",
    "TextTrainedHead": "tldr",
    "fit_text_head": "tldr",
    "build_descriptions": "tldr",
    "extract_tags": "tags",
    "TagSelfDistillationLoss": "losses.tag_distillation",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
