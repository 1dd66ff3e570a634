"""The text-trained classifier head (TLDR: text-only last-layer retraining, Park, Jeong & Moon, WACV 2025):
loss balancing, the head itself, training it from descriptions with a dual encoder, and the zero-shot
baseline and group-wise evaluation it is compared with."""

from __future__ import annotations

import logging
from dataclasses import asdict
from enum import Enum
from typing import Any, Sequence

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin

from .._matrices import as_float_matrix
from .._normalize import l2_normalize
from ._hub import HubFolderMixin
from .descriptions import DEFAULT_CLASS_PROMPT, Description, build_descriptions, check_class_names, filter_descriptions
from .encode import encode_texts, model_device
from .gap import ImageSpaceProjector

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor


class Balance(str, Enum):
    """Sample weighting of the head's training loss."""

    NONE = "none"
    CLASS = "class"  # every class weighs the same in the loss
    GROUP = "group"  # every (class, group) cell weighs the same
    AUTO = "auto"  # GROUP when groups are given, else CLASS


def balanced_weights(labels: Sequence[int], groups: Sequence[Any] | None, balance: Balance | str) -> torch.Tensor:
    """Per-sample weights (mean 1) giving every class, or every (class, group) cell, equal weight.

    Example:
        >>> [round(w, 3) for w in balanced_weights([0, 0, 0, 1], None, "class").tolist()]
        [0.667, 0.667, 0.667, 2.0]
    """
    balance = Balance(balance)
    if balance is Balance.AUTO:
        balance = Balance.GROUP if groups is not None else Balance.CLASS
    n = len(labels)
    if balance is Balance.NONE:
        return torch.ones(n)
    if balance is Balance.GROUP:
        if groups is None:
            raise ValueError("balance='group' needs groups: pass groups=... or use balance='class'.")
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries but labels has {n}.")
        keys = list(zip(labels, groups))
    else:
        keys = list(labels)
    counts: dict[Any, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    weights = torch.tensor([1.0 / counts[key] for key in keys])
    return weights * (n / weights.sum())


class TextTrainedHead(torch.nn.Module, HubFolderMixin, PyTorchModelHubMixin, tags=["tldr", "text-classification-head"]):
    """Linear classifier trained on (projected) text embeddings, applied to image embeddings.

    Inputs in the *joint* space (the dual encoder's projected embeddings) are L2-normalised,
    then either mapped by ``projector`` into the target feature space, or, without a projector,
    stripped of their component along the modality-gap direction (when ``gap_vector`` is given),
    so texts and images share one representation. With a projector the head is also a drop-in
    last layer for the target feature space itself (``space="target"``).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(40, 8)); y = (x[:, 0] > 0).astype(int)
        >>> head = TextTrainedHead(["neg", "pos"], in_dim=8).fit(x, y)
        >>> bool((head.predict(x) == y).mean() > 0.9)
        True

    ``save_pretrained(folder)``, ``from_pretrained(folder or Hub repo id)`` and ``push_to_hub(repo_id)`` come
    from huggingface_hub's `PyTorchModelHubMixin`: ``config.json`` (class names, id2label, the projector's
    config, the training summary) and ``model.safetensors`` (the linear layer, gap vector and projector).
    """

    hub_model_type = "hf_clipneg_text_head"

    def __init__(
        self,
        class_names: Sequence[str],
        in_dim: int,
        projector: ImageSpaceProjector | None = None,
        gap_vector: ArrayLike | None = None,
        normalize_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.class_names = check_class_names(class_names)
        self.in_dim = int(in_dim)
        self.normalize_inputs = normalize_inputs
        if projector is not None:
            if projector.in_dim != self.in_dim:
                raise ValueError(f"The projector takes {projector.in_dim}-dim inputs, the head {self.in_dim}.")
            if gap_vector is None and projector.gap_vector is not None:
                gap_vector = projector.gap_vector
        self.projector = projector
        if gap_vector is not None:
            gap = as_float_matrix(gap_vector, "gap_vector", dim=self.in_dim, allow_vector=True)[0].float()
            if float(gap.norm()) == 0:
                raise ValueError("gap_vector is all zeros.")
            self.register_buffer("gap_vector", gap.clone())
        else:
            self.gap_vector = None
        feature_dim = projector.out_dim if projector is not None else self.in_dim
        self.linear = torch.nn.Linear(feature_dim, len(self.class_names))
        self.training_summary: dict[str, Any] = {}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def features(self, embeds: ArrayLike, space: str = "joint") -> torch.Tensor:
        """Map inputs to the representation the linear layer reads."""
        device = self.linear.weight.device
        if space == "target":
            if self.projector is None:
                raise ValueError("space='target' needs a head with a projector (the target space is the projector's output).")
            return as_float_matrix(embeds, "embeds", dim=self.projector.out_dim, allow_vector=True).float().to(device)
        if space != "joint":
            raise ValueError(f"space must be 'joint' or 'target', got {space!r}.")
        x = as_float_matrix(embeds, "embeds", dim=self.in_dim, allow_vector=True).float().to(device)
        if self.normalize_inputs:
            x = l2_normalize(x, "embeds")
        if self.projector is not None:
            return self.projector._transform_tensor(x)
        if self.gap_vector is not None:
            u = self.gap_vector / self.gap_vector.norm()
            x = x - (x @ u).unsqueeze(1) * u
        return x

    def forward(self, embeds: ArrayLike, space: str = "joint") -> torch.Tensor:
        """Logits (n, num_classes)."""
        return self.linear(self.features(embeds, space))

    @torch.no_grad()
    def predict_proba(self, embeds: ArrayLike, space: str = "joint") -> np.ndarray:
        return torch.softmax(self.forward(embeds, space), dim=1).cpu().numpy()

    @torch.no_grad()
    def predict(self, embeds: ArrayLike, space: str = "joint") -> np.ndarray:
        """Predicted class indices (use ``head.class_names[i]`` for names)."""
        return self.forward(embeds, space).argmax(dim=1).cpu().numpy()

    def _label_ids(self, labels: Sequence[int | str] | ArrayLike) -> torch.Tensor:
        ids = []
        for row, label in enumerate(np.asarray(labels).tolist()):
            if isinstance(label, str):
                if label not in self.label2id:
                    raise ValueError(f"Label {label!r} in row {row} is not one of the classes {self.class_names}.")
                ids.append(self.label2id[label])
            elif isinstance(label, int) and 0 <= label < len(self.class_names):
                ids.append(label)
            else:
                raise ValueError(f"Label {label!r} in row {row} is neither a class name nor an index below {len(self.class_names)}.")
        return torch.tensor(ids)

    def fit(
        self,
        embeds: ArrayLike,
        labels: Sequence[int | str] | ArrayLike,
        groups: Sequence[Any] | None = None,
        *,
        space: str = "joint",
        balance: Balance | str = Balance.AUTO,
        l2: float = 1e-4,
        max_iter: int = 500,
        seed: int = 0,
    ) -> "TextTrainedHead":
        """Train the linear layer (weighted multinomial logistic regression, full-batch L-BFGS).

        ``embeds`` are usually text embeddings in the joint space; image embeddings work the
        same way (which gives the image-trained baseline). ``l2`` penalises ``||W||²``.
        """
        features = self.features(embeds, space).detach()
        targets = self._label_ids(labels).to(features.device)
        if targets.shape[0] != features.shape[0]:
            raise ValueError(f"embeds has {features.shape[0]} rows but labels has {targets.shape[0]}.")
        missing = sorted(set(range(len(self.class_names))) - set(targets.tolist()))
        if missing:
            logger.warning("No training samples for class(es) %s: they will rarely be predicted.", [self.class_names[i] for i in missing])
        weights = balanced_weights(targets.tolist(), groups, balance).to(features.device)
        torch.manual_seed(seed)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        # Standardising the features makes one l2 setting work across spaces of different scales.
        mean, std = features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)
        z = (features - mean) / std
        weight = torch.zeros_like(self.linear.weight, requires_grad=True)
        bias = torch.zeros_like(self.linear.bias, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

        def objective() -> torch.Tensor:
            loss = (torch.nn.functional.cross_entropy(z @ weight.T + bias, targets, reduction="none") * weights).mean()
            return loss + l2 * weight.pow(2).sum()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            loss = float(objective())  # LBFGS.step returns the loss before its first iteration
            self.linear.weight.copy_(weight / std)
            self.linear.bias.copy_(bias - (weight / std) @ mean)
            train_acc = float((self.linear(features).argmax(1) == targets).float().mean())
        self.training_summary.update(
            {"num_samples": int(features.shape[0]), "balance": Balance(balance).value, "l2": l2,
             "final_loss": float(loss), "train_accuracy": train_acc, "space": space}
        )
        logger.info("TextTrainedHead trained on %d samples: loss %.4f, train accuracy %.3f", features.shape[0], float(loss), train_acc)
        return self

    def _hub_config(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "id2label": {str(i): n for i, n in self.id2label.items()},
            "label2id": self.label2id,
            "num_labels": len(self.class_names),
            "in_dim": self.in_dim,
            "feature_dim": self.linear.in_features,
            "normalize_inputs": self.normalize_inputs,
            "has_gap_vector": self.gap_vector is not None,
            "projector": self.projector.config_dict() if self.projector is not None else None,
            "training_summary": self.training_summary,
        }

    def _hub_state(self) -> dict[str, torch.Tensor]:
        state = {"linear.weight": self.linear.weight, "linear.bias": self.linear.bias}
        if self.gap_vector is not None:
            state["gap_vector"] = self.gap_vector
        if self.projector is not None:
            state.update(self.projector.state_dict(prefix="projector."))
        return state

    @classmethod
    def _from_hub(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> "TextTrainedHead":
        projector = ImageSpaceProjector.from_state(config["projector"], state, "projector.") if config.get("projector") else None
        head = cls(config["class_names"], config["in_dim"], projector=projector, gap_vector=state.get("gap_vector"),
                   normalize_inputs=config.get("normalize_inputs", True))
        head.linear.load_state_dict({"weight": state["linear.weight"], "bias": state["linear.bias"]})
        head.training_summary = dict(config.get("training_summary") or {})
        return head


def zero_shot_classify(image_embeds: ArrayLike, class_prompt_embeds: ArrayLike, return_scores: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Predict the class whose prompt embedding is most cosine-similar to each image.

    ``class_prompt_embeds`` is (C, p), or (C, k, p) for k prompts per class (their normalised
    mean is used, i.e. prompt ensembling).

    Example:
        >>> import numpy as np
        >>> zero_shot_classify(np.array([[0.9, 0.1], [0.2, 0.8]]), np.eye(2)).tolist()
        [0, 1]
    """
    prompts = class_prompt_embeds
    if isinstance(prompts, np.ndarray):
        prompts = torch.from_numpy(prompts)
    prompts = torch.as_tensor(prompts)
    if prompts.ndim == 3:  # prompt ensembling: the mean of each class's normalised prompts
        prompts = torch.stack([
            l2_normalize(as_float_matrix(p, f"class_prompt_embeds[{i}]", allow_vector=True), "class_prompt_embeds").mean(0)
            for i, p in enumerate(prompts)
        ])
    prompts = as_float_matrix(prompts, "class_prompt_embeds", allow_vector=True)
    prompts = l2_normalize(prompts.double(), "class_prompt_embeds")
    images = as_float_matrix(image_embeds, "image_embeds", dim=prompts.shape[1], allow_vector=True)
    images = l2_normalize(images.double(), "image_embeds")
    scores = images @ prompts.T
    preds = scores.argmax(1).numpy()
    return (preds, scores.float().numpy()) if return_scores else preds


def group_accuracy(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Average accuracy, and worst-group accuracy over the (label, group) cells present.

    Without ``groups`` the cells are the classes alone.

    Example:
        >>> group_accuracy([0, 1, 1, 1], [0, 1, 0, 1], ["a", "a", "b", "b"])["worst_group"]
        0.0
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds has shape {preds.shape} but labels {labels.shape}.")
    if len(labels) == 0:
        raise ValueError("No samples to evaluate.")
    groups_list = list(groups) if groups is not None else [None] * len(labels)
    if len(groups_list) != len(labels):
        raise ValueError(f"groups has {len(groups_list)} entries but labels {len(labels)}.")
    correct = preds == labels
    cells: dict[tuple[Any, Any], list[bool]] = {}
    for label, group, ok in zip(labels.tolist(), groups_list, correct.tolist()):
        cells.setdefault((label, group), []).append(ok)
    per_group = {f"{label}" + (f"/{group}" if group is not None else ""): float(np.mean(v)) for (label, group), v in cells.items()}
    return {"average": float(correct.mean()), "worst_group": min(per_group.values()), "per_group": per_group}


def fit_text_head(
    model: Any,
    processor: Any,
    class_names: Sequence[str],
    descriptions: Sequence[Description] | None = None,
    projector: ImageSpaceProjector | None = None,
    gap_vector: ArrayLike | None = None,
    *,
    filter: bool = True,
    class_prompt: str = DEFAULT_CLASS_PROMPT,
    balance: Balance | str = Balance.AUTO,
    l2: float = 1e-4,
    max_iter: int = 500,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> TextTrainedHead:
    """Embed descriptions with a ``VisionTextDualEncoderModel``, filter them, train a head.

    ``descriptions`` default to :func:`build_descriptions` (class names only). Without a
    projector or a gap vector the modality gap is not handled (a warning says so). What was
    dropped is in ``head.training_summary["dropped"]``.

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> head = fit_text_head(model, processor, ["shirt", "shoe"], filter=False)
        >>> head.class_names
        ['shirt', 'shoe']
    """
    names = check_class_names(class_names)
    descriptions = list(descriptions) if descriptions is not None else build_descriptions(names)
    if not descriptions:
        raise ValueError("No descriptions to train on.")
    if projector is None and gap_vector is None:
        logger.warning("fit_text_head without a projector or gap vector: the modality gap is not handled, "
                       "so a head trained on texts may transfer poorly to images.")
    text_embeds = encode_texts(model, processor, [d.text for d in descriptions], batch_size=batch_size, device=device)
    dropped: list[Description] = []
    if filter:
        prompts = [class_prompt.format(**{"class": n}) for n in names]
        class_embeds = encode_texts(model, processor, prompts, batch_size=batch_size, device=device)
        kept, dropped = filter_descriptions(descriptions, text_embeds, class_embeds, class_names=names)
        if not kept:
            raise ValueError("filter_descriptions dropped every description; check the class names or pass filter=False.")
        dropped_ids = {id(d) for d in dropped}
        keep_rows = [i for i, d in enumerate(descriptions) if id(d) not in dropped_ids]
        text_embeds, descriptions = text_embeds[keep_rows], [descriptions[i] for i in keep_rows]
    groups = [d.group for d in descriptions]
    has_groups = any(g is not None for g in groups)
    head = TextTrainedHead(names, text_embeds.shape[1], projector=projector, gap_vector=gap_vector)
    head.to(model_device(model, device))
    head.fit(text_embeds, [d.label for d in descriptions], groups if has_groups else None,
             balance=balance, l2=l2, max_iter=max_iter)
    head.training_summary.update({"num_dropped": len(dropped), "dropped": [asdict(d) for d in dropped]})
    return head.cpu()
