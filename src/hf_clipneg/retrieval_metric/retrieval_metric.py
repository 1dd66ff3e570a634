"""`evaluate` module for image-text retrieval: Recall@K, median and mean rank in both directions.

Load it offline with ``evaluate.load("/path/to/retrieval_metric")`` or ``hf_clipneg.metrics.load_retrieval_metric()``.
All the arithmetic lives in ``hf_clipneg.metrics.retrieval_metrics``; this file only adapts it to `evaluate`.
"""

import datasets
import evaluate

from hf_clipneg.metrics import retrieval_metrics

_DESCRIPTION = """
Image-text retrieval metrics for paired data (row i of `image_embeds` belongs with row i of `text_embeds`):
text->image (t2i) and image->text (i2t) Recall@K in percent, median and mean 1-based rank of the first relevant
item, and mean_R@K (the mean of both directions). Embeddings are L2-normalised, similarity is cosine, ties are
pessimistic (an irrelevant item with the same score counts as ranked first). With `image_groups` / `text_groups`
any item of the query's group is a hit (e.g. images whose captions are identical).
"""

_KWARGS_DESCRIPTION = """
Args:
    image_embeds: one embedding (list of floats) per image.
    text_embeds: one embedding per text, same dimension, same number of rows as `image_embeds`.
    image_groups (optional): a group label per image (compute argument).
    text_groups (optional): a group label per text (compute argument). One given alone is used for both sides.
    ks (optional): the K values of Recall@K, default (1, 5, 10).
    prefix (optional): prepended to every key.
    chunk_size (optional): queries scored at once, default 1024.
Returns:
    dict: t2i_R@K, t2i_median_rank, t2i_mean_rank, i2t_R@K, i2t_median_rank, i2t_mean_rank, mean_R@K.
Examples:
    >>> import numpy as np
    >>> from hf_clipneg.metrics import load_retrieval_metric
    >>> metric = load_retrieval_metric()  # evaluate.load("/path/to/retrieval_metric"), offline
    >>> metric.compute(image_embeds=np.eye(3), text_embeds=np.eye(3), ks=[1])["t2i_R@1"]
    100.0
"""

_CITATION = """
@inproceedings{tagami2024false,
  title={Reducing False Negatives in Image-Text Retrieval with Clustering-Based Negative Sampling},
  author={Tagami and others},
  booktitle={WSCG},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMetric(evaluate.Metric):
    """Recall@K / median rank / mean rank for paired image and text embeddings."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "image_embeds": datasets.Sequence(datasets.Value("float32")),
                    "text_embeds": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(
        self, image_embeds, text_embeds, image_groups=None, text_groups=None, ks=(1, 5, 10), prefix="", chunk_size=1024
    ):
        return retrieval_metrics(
            _stack(image_embeds, "image_embeds"),
            _stack(text_embeds, "text_embeds"),
            image_groups=image_groups,
            text_groups=text_groups,
            ks=ks,
            prefix=prefix,
            chunk_size=chunk_size,
        )


def _stack(rows, name):
    """`evaluate` hands the rows back as Python lists; stack them into one float32 matrix."""
    import numpy as np

    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"All {name} must have the same dimension, got dimensions {lengths}.")
    return np.asarray(rows, dtype=np.float32)
