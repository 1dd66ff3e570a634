"""`ClipNegDualEncoderModel`: transformers' `VisionTextDualEncoderModel` with one definition of the tower
features, used by training, evaluation, mining and retrieval alike.

* Tower features are the L2-normalised pooled tower outputs: the vision tower's ``pooler_output`` and, for
  text, what `config.text_pooling` says: ``"mean"`` (attention-masked mean of ``last_hidden_state``, how
  sentence-transformers models such as all-MiniLM-L6-v2 were trained) or ``"pooler"`` (the tower's own
  ``pooler_output``, right for towers trained with it, e.g. CLIP's text model). A config without the key
  means ``"pooler"``: that is what a plain `VisionTextDualEncoderModel` computes.
* Normalising before the bias-free projections changes no normalised embedding, logit, loss or gradient
  (the projection is linear, so only the norm of its output changes), but it lets the trainer feed
  features cached once (`image_tower_features=`, `text_tower_features=`) instead of running frozen towers
  on every step, with the same result.
* With only the last blocks of the towers training, forward also takes the cached inputs of the first
  trainable block (`image_block_inputs=`, `text_block_inputs=`, see `hf_clipneg.tower_tails`) and runs only
  the trainable tail of each tower.

The model code imports only torch and transformers: the saved model stays a `VisionTextDualEncoderModel`
checkpoint that plain transformers loads (see README "What a plain transformers user gets").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import VisionTextDualEncoderModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput

from .tower_tails import run_tail

TEXT_POOLINGS = ("mean", "pooler")


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token states over the real (mask 1) tokens: (batch, tokens, hidden) -> (batch, hidden).

    Raises:
        ValueError: a row has no unmasked token (an empty text), or the shapes do not match.

    Example:
        >>> states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
        >>> mean_pool(states, torch.tensor([[1, 1, 0]]))
        tensor([[2., 3.]])
    """
    if last_hidden_state.dim() != 3 or not last_hidden_state.is_floating_point():
        raise ValueError(
            f"last_hidden_state must be a float (batch, tokens, hidden) tensor, got {last_hidden_state.dtype} "
            f"with shape {tuple(last_hidden_state.shape)}."
        )
    if tuple(attention_mask.shape) != tuple(last_hidden_state.shape[:2]):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match the (batch, tokens) = "
            f"{tuple(last_hidden_state.shape[:2])} of last_hidden_state."
        )
    mask = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)
    counts = mask.sum(dim=1)
    empty = (counts.squeeze(-1) == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"Rows {empty.tolist()[:10]} have no unmasked token; mean pooling is undefined. Check for empty texts."
        )
    return (last_hidden_state * mask).sum(dim=1) / counts


class ClipNegDualEncoderModel(VisionTextDualEncoderModel):
    """A `VisionTextDualEncoderModel` whose text embedding follows `config.text_pooling` and whose forward
    also accepts cached tower features.

    Shapes: `image_tower_features(pixel_values)` -> (B, vision hidden size); `text_tower_features(...)` ->
    (B, text hidden size); both float, L2-normalised. `forward` returns a `CLIPOutput` with normalised
    (B, projection_dim) `image_embeds` / `text_embeds`.

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> model = model.eval()
        >>> model.config.text_pooling
        'mean'
        >>> tokens = processor.tokenizer(["a red circle"], return_tensors="pt")
        >>> features = model.text_tower_features(**tokens)
        >>> out = model(text_tower_features=features, image_tower_features=torch.randn(1, 32))
        >>> bool(torch.allclose(out.text_embeds, F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)))
        True
    """

    @property
    def text_pooling(self) -> str:
        pooling = getattr(self.config, "text_pooling", "pooler")
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"config.text_pooling must be one of {TEXT_POOLINGS}, got {pooling!r}.")
        return pooling

    def image_tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, D_vision) L2-normalised pooled vision-tower output."""
        return self._encode_image(pixel_values)[0]

    def text_tower_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, D_text) L2-normalised text features pooled as `config.text_pooling` says."""
        return self._encode_text(input_ids, attention_mask, token_type_ids, position_ids)[0]

    def _encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        return self._normalized_image(self.vision_model(pixel_values=pixel_values, return_dict=True))

    def _encode_image_tail(self, block_inputs: torch.Tensor, start: int) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        return self._normalized_image(run_tail(self.vision_model, start, block_inputs))

    @staticmethod
    def _normalized_image(outputs: BaseModelOutputWithPooling) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        pooled = outputs.pooler_output
        return F.normalize(pooled.reshape(pooled.shape[0], -1), dim=-1), outputs

    def _encode_text(
        self, input_ids, attention_mask, token_type_ids, position_ids
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            return_dict=True,
        )
        return self._pooled_text(outputs, attention_mask)

    def _encode_text_tail(
        self, block_inputs: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        return self._pooled_text(run_tail(self.text_model, start, block_inputs, attention_mask), attention_mask)

    def _pooled_text(
        self, outputs: BaseModelOutputWithPooling, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        if self.text_pooling == "mean":
            pooled = mean_pool(outputs.last_hidden_state, attention_mask)
        else:
            pooled = outputs.pooler_output
        return F.normalize(pooled, dim=-1), outputs

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Projected (B, projection_dim) image features in `pooler_output` (not normalised), as transformers."""
        return BaseModelOutputWithPooling(pooler_output=self.visual_projection(self.image_tower_features(pixel_values)))

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Projected (B, projection_dim) text features in `pooler_output` (not normalised), as transformers."""
        features = self.text_tower_features(input_ids, attention_mask, token_type_ids, position_ids)
        return BaseModelOutputWithPooling(pooler_output=self.text_projection(features))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        image_tower_features: torch.Tensor | None = None,
        text_tower_features: torch.Tensor | None = None,
        image_block_inputs: torch.Tensor | None = None,
        text_block_inputs: torch.Tensor | None = None,
        image_tail_start: int | None = None,
        text_tail_start: int | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CLIPOutput:
        """Normalised embeddings and logits of the images and texts given as inputs or as cached features.

        Each side takes exactly one of its three forms: raw inputs, cached tower features, or cached inputs of
        the first trainable block (with the index of that block).

        Args:
            image_tower_features: (B, D_vision) cached `image_tower_features` instead of `pixel_values`.
            text_tower_features: (T, D_text) cached `text_tower_features` instead of `input_ids`.
            image_block_inputs: cached input of vision block `image_tail_start` (`tower_tails.block_inputs`),
                e.g. (B, C, H, W) for EfficientNet, (B, tokens, D) for ViT.
            text_block_inputs: (T, tokens, D_text) cached input of text block `text_tail_start`, with the texts'
                (T, tokens) `attention_mask`.

        Raises:
            ValueError: not exactly one form is given for a side, or a block input comes without its index.
        """
        vision_outputs = text_outputs = None
        image_form = self._one_of(
            raw=(pixel_values, "pixel_values"), features=(image_tower_features, "image_tower_features"),
            blocks=(image_block_inputs, "image_block_inputs"),
        )
        if image_form == "raw":
            image_features, vision_outputs = self._encode_image(pixel_values)
        elif image_form == "features":
            image_features = image_tower_features
        else:
            image_features, vision_outputs = self._encode_image_tail(
                image_block_inputs, self._start(image_tail_start, "image_tail_start")
            )
        text_form = self._one_of(
            raw=(input_ids, "input_ids"), features=(text_tower_features, "text_tower_features"),
            blocks=(text_block_inputs, "text_block_inputs"),
        )
        if text_form == "raw":
            text_features, text_outputs = self._encode_text(input_ids, attention_mask, token_type_ids, position_ids)
        elif text_form == "features":
            text_features = text_tower_features
        else:
            if attention_mask is None:
                raise ValueError("`text_block_inputs` need the texts' `attention_mask`.")
            text_features, text_outputs = self._encode_text_tail(
                text_block_inputs, attention_mask, self._start(text_tail_start, "text_tail_start")
            )
        image_embeds = F.normalize(self.visual_projection(image_features.to(self.visual_projection.weight.dtype)), dim=-1)
        text_embeds = F.normalize(self.text_projection(text_features.to(self.text_projection.weight.dtype)), dim=-1)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        loss = None
        if return_loss:
            labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2
        return CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )

    @staticmethod
    def _one_of(**forms: tuple[torch.Tensor | None, str]) -> str:
        given = [form for form, (value, _) in forms.items() if value is not None]
        if len(given) != 1:
            names = [name for _, name in forms.values()]
            raise ValueError(f"Pass exactly one of {', '.join(f'`{n}`' for n in names)}.")
        return given[0]

    @staticmethod
    def _start(start: int | torch.Tensor | None, name: str) -> int:
        if start is None:
            raise ValueError(f"Block inputs need `{name}`, the index of the block they are the input of.")
        return int(start)
