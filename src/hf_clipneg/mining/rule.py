"""The in-batch rule: one source of truth for the loss, the mining statistics and the mined negatives.

:func:`pair_weights` turns a batch's per-row mining columns into (B, B) negative weights (and extra
positive targets); :func:`evidence_flags` says which pairs the configured evidence flags;
:func:`random_pair_flags` is the random control's process-independent mask; :func:`distance_weights`
weighs allowed negatives by image distance (``strategy="cluster_weighted"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..features import IMAGE_FEATURES, TEXT_FEATURES
from .config import DuplicateAction, DuplicateEvidence, MiningConfig, NegativeStrategy

_M31 = (1 << 31) - 1

_HOW_TO_PRODUCE = (
    "Produce it with `mine_negatives(dataset, config)` and keep it in the batches (ClipNegCollator passes "
    "the mining columns; keep remove_unused_columns=False)."
)


def _need(batch: Mapping[str, torch.Tensor], name: str, why: str) -> torch.Tensor:
    if name not in batch:
        raise KeyError(f"The batch has no {name!r} column, which {why} needs. {_HOW_TO_PRODUCE}")
    return torch.as_tensor(batch[name])


def _cluster_block(left: Mapping, right: Mapping, modality: str, use_similar: bool) -> torch.Tensor:
    cluster_key, similar_key = f"{modality}_cluster", f"similar_{modality}_clusters"
    why = f"evidence based on {modality} clusters"
    left_cluster = _need(left, cluster_key, why).long()
    right_cluster = _need(right, cluster_key, why).long()
    blocked = (left_cluster[:, None] == right_cluster[None, :]) & (left_cluster[:, None] >= 0)
    if use_similar:
        similar = _need(left, similar_key, f"similar_cluster_quantile with {why}").long()
        if similar.dim() == 1:
            similar = similar[:, None]
        hit = (similar[:, :, None] == right_cluster[None, None, :]) & (similar[:, :, None] >= 0)
        blocked |= hit.any(dim=1)
    return blocked


def _cosine(left: Mapping, right: Mapping, key: str, why: str) -> torch.Tensor:
    a = _need(left, key, why).float()
    b = _need(right, key, why).float()
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def evidence_flags(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor], config: MiningConfig) -> torch.Tensor:
    """(B1, B2) bool: pairs (row i of `left`, row j of `right`) the configured evidence flags as duplicates.

    Self-pairs are not excluded here (:func:`pair_weights` handles the diagonal).
    """
    evidence = config.evidence
    use_similar = config.similar_cluster_quantile is not None and config.similar_cluster_quantile < 1.0
    if evidence == DuplicateEvidence.IMAGE_CLUSTER:
        return _cluster_block(left, right, "image", use_similar)
    if evidence == DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER:
        return _cluster_block(left, right, "image", use_similar) & _cluster_block(left, right, "text", use_similar)
    if evidence == DuplicateEvidence.PAIR_COSINE:
        if config.image_cosine_threshold is None:
            raise ValueError(
                "evidence='pair_cosine' needs image_cosine_threshold (set it, or set pair_quantile and run "
                "mine_negatives, which resolves the thresholds from the data)."
            )
        flags = _cosine(left, right, IMAGE_FEATURES, "evidence='pair_cosine'") > config.image_cosine_threshold
        if config.text_cosine_threshold is not None:
            flags &= _cosine(left, right, TEXT_FEATURES, "evidence='pair_cosine' with a text threshold") > config.text_cosine_threshold
        return flags
    if evidence == DuplicateEvidence.GROUP:
        return _same_group(left, right, "evidence='group'")
    if evidence == DuplicateEvidence.ANY:
        why = "evidence='any'"
        flags = _same_group(left, right, why) if config.group_column else None
        for key, threshold in ((IMAGE_FEATURES, config.image_cosine_threshold), (TEXT_FEATURES, config.text_cosine_threshold)):
            if threshold is not None:
                close = _cosine(left, right, key, why) > threshold
                flags = close if flags is None else flags | close
        if flags is None:
            raise ValueError("evidence='any' needs group_column, image_cosine_threshold or text_cosine_threshold.")
        return flags
    raise ValueError(f"Unknown evidence {evidence!r}.")


def _same_group(left: Mapping, right: Mapping, why: str) -> torch.Tensor:
    left_group = _need(left, "group", why).long()
    right_group = _need(right, "group", why).long()
    return (left_group[:, None] == right_group[None, :]) & (left_group[:, None] >= 0)


def _mix31(x: torch.Tensor) -> torch.Tensor:
    # 31-bit integer hash: every product stays below 2**58, so int64 never overflows on any device.
    x = x & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    return (x >> 16) ^ x


def random_pair_flags(row_id: torch.Tensor, fraction: float, seed: int = 0, step: int | None = None) -> torch.Tensor:
    """(B, B) bool: each off-diagonal pair is flagged with probability `fraction`, decided by a symmetric
    hash of (row ids, seed, step), so every process of a distributed run derives the same mask.

    Example:
        >>> flags = random_pair_flags(torch.arange(200), 0.3, seed=1)
        >>> bool((flags == flags.T).all()), round(flags.float().mean().item(), 1)
        (True, 0.3)
    """
    row_id = torch.as_tensor(row_id).long()
    low = torch.minimum(row_id[:, None], row_id[None, :])
    high = torch.maximum(row_id[:, None], row_id[None, :])
    salt = _mix31(torch.tensor(int(seed) * 1_000_003 + (0 if step is None else int(step) + 1), device=row_id.device))
    hashed = _mix31(low + _mix31(high + salt))
    uniform = hashed.double() / float(_M31 + 1)
    flags = uniform < fraction
    flags.fill_diagonal_(False)
    return flags


def model_guided_flags(image_embeds: torch.Tensor, text_embeds: torch.Tensor, margin: float) -> torch.Tensor:
    """(B, B) bool: the in-batch negatives the model being trained already scores like positives.

    Pair (image i, text j), i != j, is flagged when its cosine exceeds the positive's minus `margin` in either
    direction: ``cos(x_i, y_j) > min(cos(x_i, y_i), cos(x_j, y_j)) - margin`` (image i's query over texts, and
    text j's query over images). The idea of sentence-transformers' guided in-batch losses (GISTEmbed), with the
    model itself as the guide. Inputs are detached: the flags carry no gradient.

    Args:
        image_embeds, text_embeds: (B, d) embeddings of the B pairs (normalised here).
        margin: cosine units; 0 flags negatives scored above a positive, larger values flag more.

    Example:
        >>> images = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
        >>> model_guided_flags(images, images, margin=0.05).int().tolist()
        [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    """
    images = F.normalize(image_embeds.detach().float(), dim=-1)
    texts = F.normalize(text_embeds.detach().float(), dim=-1)
    similarity = images @ texts.T
    positive = similarity.diagonal()
    flags = similarity > torch.minimum(positive[:, None], positive[None, :]) - margin
    flags.fill_diagonal_(False)
    return flags


def distance_weights(image_features: torch.Tensor, allowed: torch.Tensor, power: float, max_weight: float) -> torch.Tensor:
    """(B, B) weights ((1 - cos) / row mean over allowed pairs) ** power, clipped to [0, max_weight];
    0 where not allowed."""
    features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    distance = (1.0 - features @ features.T).clamp(min=0.0)
    allowed_f = allowed.float()
    mean = (distance * allowed_f).sum(1, keepdim=True) / allowed_f.sum(1, keepdim=True).clamp(min=1.0)
    ratio = distance / mean.clamp(min=1e-6)
    weights = ratio.pow(power) if power != 0 else torch.ones_like(ratio)
    return weights.clamp(0.0, max_weight) * allowed_f


def pair_weights(
    batch: Mapping[str, torch.Tensor], config: MiningConfig, step: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """In-batch negative weights W (B, B) and extra positive targets P (B, B) or None.

    ``W[i, j]`` weighs the pair (image i, text j) as a negative: 0 = masked, 1 = a plain negative; the
    diagonal (the true pair) is set to 1 and must be ignored by the loss. ``P`` is None unless
    ``duplicate_action="positive"``: then ``P[i, i] = 1`` and flagged pairs get ``extra_positive_weight``.

    `batch` holds per-row tensors of the (possibly gathered, global) batch as written by
    :func:`mine_negatives`: ``row_id``, ``image_cluster``, ``text_cluster``, ``similar_image_clusters``
    (B, L) padded with -1, ``similar_text_clusters``, ``image_features``, ``text_features``, ``group``
    (-1 = none). Only those the configuration needs are required. Runs on the batch's device.

    Example:
        >>> config = MiningConfig(evidence="image_cluster", strategy="cluster")
        >>> W, P = pair_weights({"image_cluster": torch.tensor([0, 0, 1])}, config)
        >>> W.tolist(), P
        ([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], None)
    """
    any_column = next((torch.as_tensor(v) for v in batch.values() if torch.is_tensor(v) or isinstance(v, np.ndarray)), None)
    if any_column is None:
        raise ValueError("pair_weights needs at least one per-row tensor in the batch.")
    size, device = any_column.shape[0], any_column.device
    eye = torch.eye(size, dtype=torch.bool, device=device)
    if config.strategy == NegativeStrategy.VANILLA:
        return torch.ones(size, size, device=device), None
    if config.strategy == NegativeStrategy.RANDOM:
        if config.random_drop_fraction is None:
            raise ValueError(
                "strategy='random' needs random_drop_fraction (mine_negatives sets it to the fraction the "
                "cluster rule masks; or set it yourself)."
            )
        row_id = _need(batch, "row_id", "strategy='random'")
        flags = random_pair_flags(row_id, config.random_drop_fraction, config.seed, step)
    else:
        flags = evidence_flags(batch, batch, config) & ~eye
    weights = torch.ones(size, size, device=device)
    if config.strategy == NegativeStrategy.CLUSTER_WEIGHTED:
        image_features = _need(batch, IMAGE_FEATURES, "strategy='cluster_weighted'").to(device)
        weights = distance_weights(image_features, ~flags & ~eye, config.weight_power, config.max_weight)
    positives = None
    if config.duplicate_action == DuplicateAction.DOWNWEIGHT:
        weights = torch.where(flags, torch.full_like(weights, config.downweight_factor), weights)
    else:
        weights = weights.masked_fill(flags, 0.0)
        if config.duplicate_action == DuplicateAction.POSITIVE:
            positives = eye.float() + flags.float() * config.extra_positive_weight
    weights = weights.masked_fill(eye, 1.0)
    return weights, positives
