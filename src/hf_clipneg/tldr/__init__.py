"""TLDR: text-only last-layer retraining (Park, Jeong & Moon, WACV 2025) and the modality-gap tools.

Once the modality gap is handled, text embeddings can stand in for image embeddings when training a linear
classifier, so a group-balanced set of templated descriptions ("a photo of a women's watch", ...) gives
group-balanced last-layer retraining without a single group-annotated image.

* `gap`: :func:`modality_gap` measures the gap; :class:`ImageSpaceProjector` maps the joint space into a target
  feature space (e.g. the vision tower's own), sending the gap direction to zero.
* `descriptions`: :func:`build_descriptions` / :func:`read_descriptions` / :func:`filter_descriptions` make,
  load and validate the training texts.
* `head`: :class:`TextTrainedHead` is the linear classifier trained on (projected) text embeddings;
  :func:`fit_text_head` embeds, filters and trains in one call; :func:`zero_shot_classify` is the prompt
  baseline and :func:`group_accuracy` the evaluation.
* `encode`: text and image embeddings from a dual encoder.

The command line is ``hf-clipneg tldr`` (`hf_clipneg.cli.tldr`).

Example:
    >>> import numpy as np
    >>> from hf_clipneg.tldr import TextTrainedHead, modality_gap
    >>> gap = modality_gap(np.array([[1.0, 0.2], [1.0, -0.2]]), np.array([[0.2, 1.0], [-0.2, 1.0]]))
    >>> head = TextTrainedHead(["left", "right"], in_dim=2, gap_vector=gap.vector)
    >>> head.predict(np.array([[1.0, 0.0]])).shape
    (1,)
"""

from .descriptions import (
    DEFAULT_CLASS_PROMPT,
    DEFAULT_GROUP_TEMPLATES,
    DEFAULT_TEMPLATES,
    GROUP_SEPARATOR,
    Description,
    build_descriptions,
    check_class_names,
    filter_descriptions,
    read_descriptions,
)
from .encode import encode_images, encode_texts
from .gap import ImageSpaceProjector, ModalityGap, modality_gap
from .head import Balance, TextTrainedHead, balanced_weights, fit_text_head, group_accuracy, zero_shot_classify

__all__ = [
    "DEFAULT_CLASS_PROMPT",
    "DEFAULT_GROUP_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "GROUP_SEPARATOR",
    "Balance",
    "Description",
    "ImageSpaceProjector",
    "ModalityGap",
    "TextTrainedHead",
    "balanced_weights",
    "build_descriptions",
    "check_class_names",
    "encode_images",
    "encode_texts",
    "filter_descriptions",
    "fit_text_head",
    "group_accuracy",
    "modality_gap",
    "read_descriptions",
    "zero_shot_classify",
]
