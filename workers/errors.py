"""ifrender's errors: one base class, one kind per way a job can fail before or while it renders.

Every message says what was found, what was expected and how to fix it. Each kind also derives
from the builtin error it stands for, so callers that catch ValueError or RuntimeError keep working.
"""

from __future__ import annotations


class IfrenderError(Exception):
    """Base of every error ifrender raises on purpose."""


class ManifestError(IfrenderError, ValueError):
    """A manifest that cannot run; the message names the file and the field."""


class InputError(IfrenderError, ValueError):
    """An input that cannot be read at all; bad rows are error rows instead."""


class StorageError(IfrenderError, RuntimeError):
    """An input or output location that cannot be used; the message says which and why."""


class ModelLoadError(IfrenderError, RuntimeError):
    """A checkpoint could not be loaded offline; the message says how to stage it."""


class StagingError(IfrenderError, RuntimeError):
    """Checkpoints that cannot be staged or synced; the message names the source and the fix."""


class PlanError(IfrenderError, ValueError):
    """A cluster that cannot run the job; the message says which stage and what to change."""


class ChangedManifestError(IfrenderError, RuntimeError):
    """An output made by a job with other settings than this one's."""


class ChangedInputError(IfrenderError, RuntimeError):
    """An input that changed under shards already committed from it."""


class MissingColumnsError(IfrenderError, KeyError):
    """A batch that lacks a column its stage needs: the chain is wired wrong, not one row bad."""

    def __str__(self) -> str:
        return str(self.args[0])
