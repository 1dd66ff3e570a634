"""Model and dataset cards, and pushing / loading hf_clipneg artefacts on the Hugging Face Hub.

* :func:`render_model_card` / :func:`push_model`: a trained `VisionTextDualEncoderModel` + processor + card,
  pushed in a single commit.
* :func:`render_dataset_card` / :func:`push_mined_dataset` / :func:`load_mined_dataset`: a mined dataset
  (parquet via `datasets`), its card and ``mining_config.json`` in one commit; loading restores the mining config into each
  split's ``info.description`` (``hf_clipneg.mining_config=<json>``).

Tokens are only ever handed to `huggingface_hub`; they are never logged, rendered or written to disk, and a
card that contains the token is refused before upload.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
import string
import tempfile
from importlib import resources
from collections.abc import Mapping, Sequence
from typing import Any

from ._citations import TAGAMI_2024

from .mining.config import CONFIG_PREFIX

logger = logging.getLogger(__name__)

#: Public alias of `hf_clipneg.mining.config.CONFIG_PREFIX`: one line of ``info.description`` starting with it
#: holds the config JSON that `MiningConfig.from_dataset` reads.
MINING_CONFIG_PREFIX = CONFIG_PREFIX

MINING_CONFIG_FILENAME = "mining_config.json"
CARD_TAGS = ["hf-clipneg", "clip", "image-text-retrieval"]
DEFAULT_MODEL_COMMIT_MESSAGE = "Upload hf_clipneg dual encoder"
DEFAULT_DATASET_COMMIT_MESSAGE = "Upload hf_clipneg mined dataset"

CITATION = TAGAMI_2024

# Configuration keys whose values must never reach a card (e.g. TrainingArguments.hub_token).
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)


class CardTokenLeakError(ValueError):
    """A rendered card contains the access token used to push it; nothing was uploaded."""


# --------------------------------------------------------------------------------------------- helpers
def _template(name: str) -> string.Template:
    text = resources.files("hf_clipneg").joinpath("templates", name).read_text(encoding="utf-8")
    return string.Template(text)


def _plain(value: Any) -> Any:
    """JSON/YAML-safe copy of a config value (dataclasses, enums, numpy scalars, paths), secrets removed."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy / torch scalar
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _config_dict(config: Any, what: str) -> dict:
    if config is None:
        return {}
    if callable(getattr(config, "to_dict", None)):  # MiningConfig, MiningStats, TrainingArguments
        config = config.to_dict()
    plain = _plain(config)
    if not isinstance(plain, dict):
        raise TypeError(f"{what} must be a dict or a dataclass, got {type(config).__name__}")
    return plain


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000).strip()


def _json_block(data: dict) -> str:
    if not data:
        return "_Not recorded._"
    return "```json\n" + json.dumps(data, indent=2, sort_keys=True) + "\n```"


def _metric_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "metric"


def _md_cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: tuple[str, str], rows: Mapping[str, Any]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _check_no_token(text: str, token: str | bool | None, what: str) -> None:
    if isinstance(token, str) and token and token in text:
        raise CardTokenLeakError(f"The {what} contains the access token; refusing to upload it. Remove it from the "
                                 "configuration you passed (keys named like 'token' are dropped automatically).")


def _split_front_matter(text: str) -> tuple[dict, str]:
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*\n?(.*)$", text, flags=re.DOTALL)
    if not match:
        return {}, text
    return yaml.safe_load(match.group(1)) or {}, match.group(2)


# --------------------------------------------------------------------------------------------- model card
def render_model_card(
    base_towers: Mapping[str, Any],
    dataset: str | None = None,
    mining_config: Mapping[str, Any] | Any | None = None,
    negative_strategy: str | None = None,
    eval_results: Mapping[str, float] | None = None,
    training_args: Mapping[str, Any] | Any | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    losses: Sequence[Any] = (),
) -> str:
    """Render the README.md model card of a dual encoder trained with hf_clipneg.

    ``losses`` are the loss objects the model was trained with: each one's ``get_config_dict()`` goes into the
    card, and its ``citation`` (BibTeX) joins the card's citations.

    ``base_towers`` names the towers (e.g. ``{"vision": "google/vit-base-patch16-224", "text": "bert-base"}``),
    ``eval_results`` maps metric names (e.g. ``"text_to_image/R@1"``) to values; they go into an evaluation
    table and the card's ``model-index``. Keys that look like secrets (``hub_token``...) are dropped from the
    configurations.

    Example:
        >>> card = render_model_card({"vision": "vit-tiny", "text": "bert-tiny"}, dataset="user/pairs",
        ...                          eval_results={"text_to_image/R@1": 0.5}, repo_id="user/model")
        >>> "library_name: transformers" in card and "| text_to_image/R@1 | 0.5000 |" in card
        True
    """
    towers = _config_dict(base_towers, "base_towers")
    mining = _config_dict(mining_config, "mining_config")
    training = _config_dict(training_args, "training_args")
    metrics = {str(k): float(v) for k, v in (eval_results or {}).items()}
    name = repo_id.split("/")[-1] if repo_id else "hf-clipneg-dual-encoder"

    front: dict[str, Any] = {"library_name": "transformers"}
    if license:
        front["license"] = license
    front["tags"] = [*CARD_TAGS, "vision-text-dual-encoder"]
    base_models = [v for v in towers.values() if isinstance(v, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", v)]
    if base_models:
        front["base_model"] = base_models
    if dataset:
        front["datasets"] = [dataset]
    if metrics:
        front["model-index"] = [{
            "name": name,
            "results": [{
                "task": {"type": "image-text-retrieval", "name": "Image-Text Retrieval"},
                "dataset": {"type": dataset or "custom", "name": dataset or "custom"},
                "metrics": [{"type": _metric_slug(k), "name": k, "value": v} for k, v in metrics.items()],
            }],
        }]

    towers_section = _md_table(("Tower", "Initialised from"), towers) if towers else "_Base towers not recorded._"
    eval_section = (_md_table(("Metric", "Value"), metrics) + "\n\nR@K: fraction of queries whose match is in the "
                    "top K results.") if metrics else "_No evaluation results were recorded._"
    training_section = _json_block(training) if training else "_Training arguments were not recorded._"
    if losses:
        configs = {type(loss).__name__: loss.get_config_dict() if hasattr(loss, "get_config_dict") else {}
                   for loss in losses}
        training_section = "Losses:\n\n" + _json_block(configs) + "\n\nTraining arguments:\n\n" + training_section
    citations = [CITATION] + [c for c in (getattr(loss, "citation", None) for loss in losses) if c and c != CITATION]
    return _template("model_card_template.md").substitute(
        front_matter=_yaml(front),
        title=name,
        towers_section=towers_section,
        dataset_section=f"[{dataset}](https://huggingface.co/datasets/{dataset})" if dataset else "not recorded",
        negative_strategy=negative_strategy or "not recorded",
        mining_section=_json_block(mining),
        eval_section=eval_section,
        training_section=training_section,
        repo_id=repo_id or "<user>/<model>",
        citation="\n\n".join(citations),
    )


def push_model(
    model: Any,
    processor: Any,
    repo_id: str,
    model_card: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_MODEL_COMMIT_MESSAGE,
    revision: str | None = None,
) -> str:
    """Push a model, its processor and its card to ``repo_id`` in one commit; return the commit URL.

    The repo is created if needed (``private`` only applies to a new repo). Raises `CardTokenLeakError`
    without uploading anything when the card contains ``token``.

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> card = render_model_card({"vision": "tiny-vit", "text": "tiny-bert"}, repo_id="me/tiny")
        >>> push_model(model, processor, "me/tiny", card, token="hf_...")  # doctest: +SKIP
        'https://huggingface.co/me/tiny/commit/...'
    """
    from huggingface_hub import HfApi

    _check_no_token(model_card, token, "model card")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="hf_clipneg_push_") as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card)
        logger.info("Pushing model, processor and card to %s", repo_id)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                   commit_message=commit_message, revision=revision)
    return str(commit)


# --------------------------------------------------------------------------------------------- dataset card
def render_dataset_card(
    mining_config: Mapping[str, Any] | Any,
    stats: Mapping[str, Any] | str | None = None,
    source: str | None = None,
    repo_id: str | None = None,
    license: str = "other",
) -> str:
    """Render the README.md card of a mined dataset.

    ``stats`` is a dict (rendered as a table), ready markdown, or an object with ``to_markdown()``
    (``MiningStats``). The YAML front matter carries the license, the
    tags and the mining config under ``hf_clipneg.mining_config``.

    Example:
        >>> card = render_dataset_card({"n_clusters": 8, "negatives_per_row": 4}, {"rows": 100}, "user/pairs")
        >>> "image-text-retrieval" in card and "| rows | 100 |" in card
        True
    """
    mining = _config_dict(mining_config, "mining_config")
    if callable(getattr(stats, "to_markdown", None)):  # MiningStats
        stats = stats.to_markdown()
    if isinstance(stats, str):
        stats_section = stats.strip() or "_No statistics recorded._"
    elif stats:
        stats_section = _md_table(("Statistic", "Value"), _config_dict(stats, "stats"))
    else:
        stats_section = "_No statistics recorded._"
    front: dict[str, Any] = {"license": license, "tags": list(CARD_TAGS), "task_categories": ["feature-extraction"]}
    if source:
        front["source_datasets"] = [source]
    front["hf_clipneg"] = {"mining_config": mining}
    return _template("dataset_card_template.md").substitute(
        front_matter=_yaml(front),
        title=(repo_id.split("/")[-1] if repo_id else "hf_clipneg mined dataset"),
        source=source or "not recorded",
        mining_section=_json_block(mining),
        stats_section=stats_section,
        repo_id=repo_id or "<user>/<dataset>",
        citation=CITATION,
    )


def _merge_card(existing: str, ours: str) -> str:
    """Our card's body and YAML on top of the YAML `datasets` wrote (dataset_info, configs...); tags are unioned."""
    old_meta, _ = _split_front_matter(existing)
    new_meta, body = _split_front_matter(ours)
    merged = {**old_meta, **new_meta}
    merged["tags"] = list(dict.fromkeys([*(old_meta.get("tags") or []), *(new_meta.get("tags") or [])]))
    return f"---\n{_yaml(merged)}\n---\n\n{body.lstrip()}"


def check_hub_repo_id(repo_id: str, what: str = "repo_id") -> str:
    """Raise a ValueError naming `what` unless `repo_id` is a valid Hub repo id ('name' or 'namespace/name')."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str):
        raise TypeError(f"{what} must be a string such as 'user/name', got a {type(repo_id).__name__}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repo id: {err}") from None
    return repo_id


def push_mined_dataset(
    dataset_or_dict: Any,
    repo_id: str,
    mining_config: Mapping[str, Any] | Any,
    stats: Mapping[str, Any] | str | None = None,
    private: bool = False,
    token: str | None = None,
    source: str | None = None,
    commit_message: str = DEFAULT_DATASET_COMMIT_MESSAGE,
) -> str:
    """Push a mined `Dataset` / `DatasetDict`, its card and ``mining_config.json`` in one commit; return its URL.

    The data goes through ``push_to_hub`` (parquet shards + the ``dataset_info``/``configs`` YAML it writes) onto
    a temporary branch; one commit on ``main`` (based on the head the push started from) then carries the
    branch's data files, our card merged into that README, and ``mining_config.json``. If anything fails,
    ``main`` is left as it was (an earlier push stays complete) and the temporary branch is deleted.

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"text": ["a red circle"], "image_cluster": [0]})
        >>> push_mined_dataset(ds, "me/mined", {"n_clusters": 1}, token="hf_...")  # doctest: +SKIP
        'https://huggingface.co/datasets/me/mined/commit/...'
    """
    import uuid

    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    check_hub_repo_id(repo_id)
    mining = _config_dict(mining_config, "mining_config")
    card = render_dataset_card(mining, stats, source, repo_id=repo_id)
    _check_no_token(card, token, "dataset card")
    config_json = json.dumps(mining, indent=2, sort_keys=True)
    _check_no_token(config_json, token, "mining config")

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    parent = api.repo_info(repo_id, repo_type="dataset", revision="main").sha
    staging = f"hf-clipneg-staging-{uuid.uuid4().hex[:12]}"
    api.create_branch(repo_id, branch=staging, revision=parent, repo_type="dataset")
    logger.info("Pushing mined dataset to %s (staged on branch %s)", repo_id, staging)
    try:
        dataset_or_dict.push_to_hub(repo_id, token=token, revision=staging, commit_message=commit_message)

        def files(revision: str) -> dict[str, Any]:
            tree = api.list_repo_tree(repo_id, revision=revision, recursive=True, repo_type="dataset")
            return {item.path: item for item in tree if isinstance(item, RepoFile)}

        staged, current = files(staging), files(parent)
        ours = ("README.md", MINING_CONFIG_FILENAME)
        operations: list[Any] = [
            CommitOperationCopy(src_path_in_repo=path, path_in_repo=path, src_revision=staging)
            for path, item in sorted(staged.items())
            if path not in ours and (path not in current or current[path].blob_id != item.blob_id)
        ]
        operations += [CommitOperationDelete(path) for path in sorted(current) if path not in staged and path not in ours]
        existing = ""
        if "README.md" in staged:
            readme_path = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=staging)
            with open(readme_path, encoding="utf-8") as f:
                existing = f.read()
        else:
            logger.warning("No README.md after push_to_hub on %s; writing the card alone.", repo_id)
        merged = _merge_card(existing, card)
        _check_no_token(merged, token, "dataset card")
        operations += [
            CommitOperationAdd("README.md", merged.encode("utf-8")),
            CommitOperationAdd(MINING_CONFIG_FILENAME, config_json.encode("utf-8")),
        ]
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description="hf_clipneg mined dataset: data, card and mining_config.json",
            repo_type="dataset",
            revision="main",
            parent_commit=parent,
        )
    finally:
        try:
            api.delete_branch(repo_id, branch=staging, repo_type="dataset")
        except Exception as err:  # the result (or the original error) matters more than the cleanup
            logger.warning("Could not delete the temporary branch %s of %s (%s); delete it by hand.", staging,
                           repo_id, type(err).__name__)
    return str(commit)


def load_mined_dataset(
    repo_id: str,
    split: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Any:
    """``load_dataset(repo_id)`` plus the mining config restored into every split's ``info.description``.

    ``MiningConfig.from_dataset(ds)`` then returns the config the dataset was mined with.

    The config comes from ``mining_config.json`` (or, failing that, the card's ``hf_clipneg`` YAML key);
    a repo with neither raises `FileNotFoundError`.

    Example:
        >>> ds = load_mined_dataset("me/mined", split="train")  # doctest: +SKIP
        >>> ds.info.description.startswith(MINING_CONFIG_PREFIX)  # doctest: +SKIP
        True
    """
    from datasets import DatasetDict, load_dataset

    config = _fetch_mining_config(repo_id, revision, token)
    loaded = load_dataset(repo_id, split=split, revision=revision, token=token)
    config_line = MINING_CONFIG_PREFIX + json.dumps(config, sort_keys=True)  # one line, as mining writes it
    splits = loaded.values() if isinstance(loaded, DatasetDict) else [loaded]
    for ds in splits:
        kept = [line for line in (ds.info.description or "").splitlines() if not line.startswith(MINING_CONFIG_PREFIX)]
        ds.info.description = "\n".join(kept + [config_line])
    return loaded


def _fetch_mining_config(repo_id: str, revision: str | None, token: str | bool | None) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, MINING_CONFIG_FILENAME, repo_type="dataset", revision=revision, token=token)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except EntryNotFoundError:
        pass
    try:
        path = hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=revision, token=token)
    except EntryNotFoundError:
        path = None
    if path is not None:
        with open(path, encoding="utf-8") as f:
            meta, _ = _split_front_matter(f.read())
        config = (meta.get("hf_clipneg") or {}).get("mining_config")
        if isinstance(config, dict):
            return config
    raise FileNotFoundError(
        f"Dataset repo {repo_id!r} has no {MINING_CONFIG_FILENAME} and no 'hf_clipneg' key in its card, so the rule "
        "its negatives were mined with is unknown: it was not pushed with push_mined_dataset (which commits data, "
        f"card and {MINING_CONFIG_FILENAME} together). To repair it, push the mined dataset again with "
        "push_mined_dataset (or `hf-clipneg mine ... --push_to_hub`); or load it with datasets.load_dataset and pass "
        "mining_config= yourself."
    )


__all__ = [
    "MINING_CONFIG_PREFIX",
    "MINING_CONFIG_FILENAME",
    "CITATION",
    "CardTokenLeakError",
    "render_model_card",
    "render_dataset_card",
    "push_model",
    "push_mined_dataset",
    "load_mined_dataset",
    "check_hub_repo_id",
]
