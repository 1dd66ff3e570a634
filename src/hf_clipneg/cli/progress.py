"""Progress bars of the libraries the commands drive, on or off."""

from __future__ import annotations


def set_progress_bars(enabled: bool) -> None:
    """Turn the progress bars of `datasets` (embedding, mining, loading), `huggingface_hub` (downloads, uploads)
    and transformers (loading and writing weights) on or off; the Trainer's own bar follows `--disable_tqdm`."""
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging as transformers_logging

    if enabled:
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()
        transformers_logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
        transformers_logging.disable_progress_bar()
