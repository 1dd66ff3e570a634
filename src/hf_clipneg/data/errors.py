"""The errors `load_pairs` raises for sources it refuses (bad images raise `images.BadImageError`)."""

from __future__ import annotations


class MissingColumnError(ValueError):
    """A column the caller named is not in the dataset. `role` ("image", "caption", ...), `column` (the name asked
    for) and `available` (the dataset's columns) let a command-line tool say it in its own option names."""

    def __init__(self, message: str, role: str, column: str, available: list[str]) -> None:
        super().__init__(message)
        self.role, self.column, self.available = role, column, available


class SplitNotFoundError(ValueError):
    """The requested split does not exist in the source (the message names the splits that do)."""


class ForeignImagePathError(ValueError):
    """A dataset from the Hub points its images at files outside its own repository; they are never read."""


class RemoteImageError(ValueError):
    """The image column holds URLs (http://, https://, s3://, ...): images are never fetched at run time."""
