"""The project's exception hierarchy: every error a user can cause is a PipelineError."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base class of every error the pipeline reports to a user (the CLI prints it without a traceback)."""


class CatalogError(PipelineError, ValueError):
    """The catalog (or an override of it) is malformed: names the key, what is wrong and the valid choices.

    Also a ValueError: a notebook passing a bad matcher parameter or name catches it the usual way.
    """


class InputError(PipelineError, ValueError):
    """A bad argument to a function a user calls (an image, points, a pair id): also a ValueError."""


class DownloadError(PipelineError):
    """An archive could not be fetched or verified."""


class ChecksumError(DownloadError):
    """A fetched or hand-placed file does not have the expected size or sha256."""


class UnsafeArchiveError(DownloadError):
    """An archive holds an entry that would land outside its target folder."""


class DataError(PipelineError):
    """A dataset file is missing or malformed; carries the offending path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class StageError(PipelineError):
    """A stage cannot run: its inputs are missing (run the earlier stage) or some of its units failed."""
