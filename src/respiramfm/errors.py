"""One exception family for everything respiramfm reports to a user.

Every error that concerns a file carries the file's path and the cause, so a
batch job can write ``path<TAB>cause`` to its error report and move on.
"""

from __future__ import annotations

import os


class RespiraMFMError(Exception):
    """Base class of every error raised on purpose by respiramfm."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, cause: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.cause = cause if cause is not None else message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class AudioDecodeError(RespiraMFMError):
    """An audio file (or array) is empty, truncated, corrupt, unsupported or non-finite."""


class DataError(RespiraMFMError):
    """A dataset, manifest or metadata file is malformed or inconsistent (bad CSV, unknown label, leakage)."""


class CheckpointError(RespiraMFMError):
    """A checkpoint is missing keys, has unexpected keys, wrong shapes, or unsafe content."""


class ConfigError(RespiraMFMError):
    """A configuration file or override is invalid."""


class AudioContentError(AudioDecodeError):
    """An audio file decodes but holds nothing to hear (too short after trimming, or digital silence)."""
