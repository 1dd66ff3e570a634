"""Training: `ClipNegTrainer` and its arguments, the batches it builds (collator, samplers), which tower weights
train, the cached-tower path, checkpoints, evaluation helpers and the model card."""

from .arguments import ClipNegTrainingArguments, TowerTraining
from .collator import ClipNegCollator, captions_by_row_id, text_features_by_row_id
from .freezing import LogitScaleCap, set_tower_training
from .samplers import ClusterSpreadSampler, CrowdedBatchSampler
from .trainer import ClipNegTrainer

__all__ = [
    "ClipNegCollator",
    "ClipNegTrainer",
    "ClipNegTrainingArguments",
    "ClusterSpreadSampler",
    "CrowdedBatchSampler",
    "LogitScaleCap",
    "TowerTraining",
    "captions_by_row_id",
    "set_tower_training",
    "text_features_by_row_id",
]
