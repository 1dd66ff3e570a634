"""Loading the dual encoder a retriever embeds with, from a local folder or a Hub repo, with errors that say why."""

from __future__ import annotations

import os
from typing import Any

from transformers import PretrainedConfig, VisionTextDualEncoderProcessor

from hf_clipneg.modeling import ClipNegDualEncoderModel

DUAL_ENCODER_MODEL_TYPE = "vision-text-dual-encoder"


class NotADualEncoderError(ValueError):
    """The checkpoint exists but is not a `VisionTextDualEncoderModel`."""


def load_dual_encoder(
    repo_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
) -> tuple[ClipNegDualEncoderModel, VisionTextDualEncoderProcessor]:
    """Load a dual encoder and its processor from a local folder or a Hub repo.

    Raises `FileNotFoundError` for a path-like source that is not a folder, `NotADualEncoderError` (naming the
    checkpoint's actual model type) when the checkpoint is not a ``vision-text-dual-encoder``, and `OSError`
    with the repo and revision when its config, weights or processor cannot be loaded. `trust_remote_code` is
    forwarded to transformers only when True.

    Example:
        >>> import tempfile
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> folder = tempfile.mkdtemp()
        >>> for part in build_tiny_dual_encoder(projection_dim=8):
        ...     _ = part.save_pretrained(folder)
        >>> model, processor = load_dual_encoder(folder)
        >>> type(model).__name__, model.config.projection_dim
        ('ClipNegDualEncoderModel', 8)
    """
    source = os.fspath(repo_or_path)
    hub_kwargs: dict[str, Any] = {"revision": revision, "token": token}
    if trust_remote_code:  # forwarded only when the user asked for it
        hub_kwargs["trust_remote_code"] = True
    where = f"{source!r}" + (f" at revision {revision!r}" if revision else "")
    looks_local = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(source)):
        raise FileNotFoundError(
            f"The local checkpoint folder {source!r} does not exist. Pass the folder written by "
            "save_pretrained (holding config.json), or a Hub repo id such as 'namespace/name'."
        )
    source = os.path.expanduser(source)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, revision=revision, token=token)
    except OSError as err:
        raise OSError(
            f"Cannot load a model config from {where}: {err}\nCheck that the local folder exists and holds a "
            "config.json, or that the Hub repo id, the revision (branch, tag or commit) and your token are right."
        ) from err
    model_type = config_dict.get("model_type")
    if model_type != DUAL_ENCODER_MODEL_TYPE:
        architectures = config_dict.get("architectures") or []
        raise NotADualEncoderError(
            f"{where} is a {model_type!r} checkpoint (architectures: {architectures or 'unknown'}), not a "
            f"{DUAL_ENCODER_MODEL_TYPE!r} one. ClipNegRetriever needs a VisionTextDualEncoderModel: one trained with "
            "hf_clipneg, or one built with VisionTextDualEncoderModel.from_vision_text_pretrained(vision, text)."
        )
    try:
        model = ClipNegDualEncoderModel.from_pretrained(source, **hub_kwargs)
        processor = VisionTextDualEncoderProcessor.from_pretrained(source, **hub_kwargs)
    except OSError as err:
        raise OSError(
            f"Found a dual-encoder config in {where} but could not load its weights or processor: {err}\n"
            "A checkpoint needs the model weights plus the tokenizer and image processor files "
            "(save both with model.save_pretrained(folder) and processor.save_pretrained(folder))."
        ) from err
    return model, processor

