"""BibTeX of the papers the project follows (torch-free, so the Hub cards can cite them without loading torch)."""

TAGAMI_2024 = """@inproceedings{tagami2024automatic,
  title     = {Automatic data generation of incorrect image-text pairs for effective contrastive learning of {CLIP} model},
  author    = {Tagami and Kobayashi and Akizuki and Hashimoto},
  booktitle = {WSCG 2024: International Conference in Central Europe on Computer Graphics, Visualization and Computer Vision},
  year      = {2024}
}"""
