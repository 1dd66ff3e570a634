"""The model card `ClipNegTrainer.push_to_hub` uploads."""

from __future__ import annotations

import os
from typing import Any


def write_model_card(trainer: Any, dataset: str | list[str] | None = None) -> None:
    """Write README.md into the trainer's `output_dir` from `model_card_template.md`: towers, dataset, mining
    config, negative strategy, losses and the last evaluation's retrieval metrics (used by `push_to_hub`)."""
    from ..hub import render_model_card

    config = trainer.model.config
    towers = {
        "vision": getattr(config.vision_config, "_name_or_path", "") or config.vision_config.model_type,
        "text": getattr(config.text_config, "_name_or_path", "") or config.text_config.model_type,
    }
    last_eval = next((log for log in reversed(trainer.state.log_history) if any(k.startswith("eval_") for k in log)), {})
    eval_results = {
        k.removeprefix("eval_"): v
        for k, v in last_eval.items()
        if k.startswith("eval_") and isinstance(v, (int, float)) and ("R@" in k or "rank" in k)
    }
    card = render_model_card(
        towers,
        dataset=dataset if isinstance(dataset, str) else None,
        mining_config=trainer.mining_config.to_dict(),
        negative_strategy=trainer.mining_config.strategy.value,
        eval_results=eval_results,
        training_args={k: v for k, v in trainer.args.to_dict().items() if not k.endswith("token")},
        repo_id=trainer.hub_model_id if hasattr(trainer, "hub_model_id") else trainer.args.hub_model_id,
        losses=[trainer.loss_fn] + ([trainer.ttd_loss] if trainer.args.ttd_weight > 0 else []),
    )
    with open(os.path.join(trainer.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
