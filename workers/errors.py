"""ifrender's errors: one base class, one kind per way a job can fail before or while it renders.

Every message says what was found, what was expected and how to fix it. Each kind also derives
from the builtin error it stands for, so callers that catch ValueError or RuntimeError keep working.
"""

from __future__ import annotations

import errno
import re

# A row that failed in a stage or the writer records "<stage>: <ExceptionType>: <message>"
# (row_error); a row that failed at read time records what is wrong with its input instead.
_STAGE_FAILURE = re.compile(r"^[a-z0-9_+]+: ([A-Z]\w*(?:Error|Exception|Failure|Exit)): ")
# Raised by a stage about the row itself (a size over max_pixels, a value a model refuses): the
# same row fails the same way on another try.
_ABOUT_THE_ROW = {"ValueError", "TypeError", "KeyError", "IndexError", "AssertionError", "NotImplementedError"}


def row_error(stage: str, err: BaseException) -> str:
    """A row's error message for a failure in `stage` (a model stage, a group, or write)."""
    return f"{stage}: {type(err).__name__}: {err}"


# An init image or mask that was not there or could not be read when the row was (jobs/input/images.py):
# it may be uploaded later, or the storage may answer next time.
_IMAGE_UNAVAILABLE = re.compile(r"^(image|mask_image): (cannot read \S+ \(|\S+ not found; )")


def retryable(error: str) -> bool:
    """Whether a failed row could pass on another try: a model, device or storage failure in a
    stage (out of memory, a lost device, a storage timeout), or an init image not there yet; not
    its input (a bad seed, a corrupt image, a size over max_pixels) nor a verdict on its image
    (the safety checker's)."""
    found = _STAGE_FAILURE.match(error or "")
    if found:
        return found.group(1) not in _ABOUT_THE_ROW
    return bool(_IMAGE_UNAVAILABLE.match(error or ""))


class IfrenderError(Exception):
    """Base of every error ifrender raises on purpose."""


class ManifestError(IfrenderError, ValueError):
    """A manifest that cannot run; the message names the file and the field."""


class InputError(IfrenderError, ValueError):
    """An input that cannot be read at all; bad rows are error rows instead."""


class StorageError(IfrenderError, RuntimeError):
    """An input or output location that cannot be used; the message says which and why."""


class StorageFailure(StorageError):
    """The output refused a write for a reason of its own (disk full, permission denied, read-only,
    access denied): no row is failed for it, its shard stays open, and the run stops (exit 4)."""


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


# Failures of the place written to, not of one row: what a retry of the row cannot mend.
_FAILING_ERRNOS = {
    errno.ENOSPC: "no space left on the device. Fix: free space there (or point output.path elsewhere)",
    errno.EDQUOT: "the disk quota is used up. Fix: free space or raise the quota",
    errno.EACCES: "permission denied. Fix: give this user write permission on the output folder",
    errno.EPERM: "operation not permitted. Fix: give this user write permission on the output folder",
    errno.EROFS: "the file system is read-only. Fix: mount it read-write, or point output.path elsewhere",
}
_FAILING_S3_CODES = {
    "AccessDenied": "access denied. Fix: give the role s3:PutObject (and s3:DeleteObject) on the output prefix",
    "AllAccessDisabled": "access to the bucket is disabled. Fix: check the bucket's owner and policy",
    "InvalidAccessKeyId": "the access key is not known. Fix: check the credentials",
    "SignatureDoesNotMatch": "the credentials do not match. Fix: check the secret key",
    "ExpiredToken": "the credentials expired. Fix: renew them",
    "NoSuchBucket": "the bucket is gone. Fix: create it again or point output.path elsewhere",
}


def storage_failure(err: BaseException) -> str | None:
    """The cause and its fix when `err` (or an error that caused it) is the storage refusing
    writes, not something about one row; None otherwise."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in _FAILING_ERRNOS:
            return _FAILING_ERRNOS[err.errno]
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code in _FAILING_S3_CODES:
                return _FAILING_S3_CODES[code]
        # A Ray task's error carries the task's own exception as `cause`.
        err, seen = getattr(err, "cause", None) or err.__cause__ or err.__context__, seen + 1
    return None
