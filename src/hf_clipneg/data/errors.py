"""The errors `load_pairs` raises for sources it refuses (bad images raise `images.BadImageError`)."""

from __future__ import annotations


class SplitNotFoundError(ValueError):
    """The requested split does not exist in the source (the message names the splits that do)."""


class ForeignImagePathError(ValueError):
    """A dataset from the Hub points its images at files outside its own repository; they are never read."""


class RemoteImageError(ValueError):
    """The image column holds URLs (http://, https://, s3://, ...): images are never fetched at run time."""
