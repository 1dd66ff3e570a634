"""hf_clipneg: CLIP-style image-text training without false negatives."""

__version__ = "0.1.0"
