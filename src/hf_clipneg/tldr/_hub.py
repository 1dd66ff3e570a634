"""Save, load and push the TLDR models like Hub models: a folder or Hub repo holding ``config.json`` (with a
``model_type``) and ``model.safetensors``, through huggingface_hub's `ModelHubMixin`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import ModelHubMixin, constants, hf_hub_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file, save_file

CONFIG_NAME = constants.CONFIG_NAME  # "config.json"
WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"

T = TypeVar("T", bound="HubFolderMixin")

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_class }}

{{ summary }}

Made with `hf_clipneg` (text-only last-layer retraining, TLDR). Load it with

```python
from hf_clipneg.tldr import {{ model_class }}

model = {{ model_class }}.from_pretrained("{{ repo_id | default("<repo id or folder>", true) }}")
```
"""


class HubFolderMixin(ModelHubMixin, library_name="hf_clipneg", model_card_template=MODEL_CARD_TEMPLATE):
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for a class that describes itself as a JSON config
    and a dict of tensors.

    A subclass sets `hub_model_type` (written to and checked in ``config.json``) and implements `_hub_config`
    (JSON-able dict), `_hub_state` (name -> tensor) and the classmethod `_from_hub(config, state)`.

    Errors: a local path that does not exist, or a folder without ``config.json`` or ``model.safetensors``, raise
    `FileNotFoundError`; a config of another ``model_type`` raises `ValueError`.
    """

    hub_model_type: ClassVar[str]

    def _hub_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _hub_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def _from_hub(cls: type[T], config: dict[str, Any], state: dict[str, torch.Tensor]) -> T:
        raise NotImplementedError

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The README.md written beside the weights: the class, its one-line summary and how to load it."""
        kwargs.setdefault("model_class", type(self).__name__)
        kwargs.setdefault("summary", (type(self).__doc__ or "").strip().split("\n\n")[0])
        return super().generate_model_card(*args, **kwargs)

    @classmethod
    def from_pretrained(cls: type[T], pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> T:
        """Load from a folder written by `save_pretrained` or from a Hub repo written by `push_to_hub`
        (keyword arguments: `revision`, `token`, `cache_dir`, `force_download`, `local_files_only`)."""
        _check_local_source(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        config = {"model_type": self.hub_model_type, **self._hub_config()}
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self._hub_state().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME))

    @classmethod
    def _from_pretrained(
        cls: type[T],
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        **from_config: Any,
    ) -> T:
        # The mixin also passes the config values named like __init__ parameters; the config is read as a whole.
        unexpected = sorted(set(from_config) - set(config or {}))
        if unexpected:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {unexpected}.")
        if config is None:
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {model_id}: is this a directory (or Hub repo) written by save_pretrained?"
            )
        if config.get("model_type") != cls.hub_model_type:
            raise ValueError(f"{model_id} describes a {config.get('model_type')!r}, not a {cls.hub_model_type!r}.")
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"No {WEIGHTS_NAME} in {model_id}: is this a directory written by save_pretrained?")
        else:
            weights = hf_hub_download(model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only, token=token)
        return cls._from_hub(config, load_file(weights))


def _check_local_source(source: str | os.PathLike) -> None:
    """Raise `FileNotFoundError` for a local source that cannot be a saved model, before the mixin would send
    it to the Hub as a repo id: a `Path`, or a string that exists or is no valid repo id."""
    path = os.fspath(source)
    looks_local = isinstance(source, os.PathLike) or os.path.exists(path)
    if not looks_local:
        try:
            validate_repo_id(path)
        except HFValidationError:
            looks_local = True
    if looks_local and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {path}: is this a directory written by save_pretrained?")
