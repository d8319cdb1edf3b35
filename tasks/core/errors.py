"""Errors that are the user's to fix (a wrong path, an unknown version, a bad value).

The CLI prints them as one line, ``mpemd: error: <message>``, with no traceback (``-v`` shows it);
flows and tasks raise them instead of retrying what cannot succeed. The message says what is wrong
and, where it can, what exists instead.

Never retried (``is_retryable``): a ``UserError``, the storage errors no retry can fix (a missing
file or folder, permission denied, no S3 credentials) and an HTTP 4xx answer other than 408 and 429.
Everything else (timeouts, 5xx, connection resets) is retried. One rule for Prefect's task retries
(``retry_condition``) and for the per-image retries of ``tasks.ingest.fetch``.
"""

from __future__ import annotations

import difflib
import os
import posixpath
from typing import Any

from tasks.core import storage


class UserError(Exception):
    """A problem in the user's input or environment, not a bug: reported in one line, never retried."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user named does not exist; still a ``FileNotFoundError`` for callers that catch that."""


class UnknownChoiceError(UserError, ValueError):
    """A value that names nothing that exists, or more than one thing (an unknown or ambiguous version)."""


# errno-less OSErrors that say the same (s3fs maps NoSuchKey/AccessDenied to these two); FileExistsError:
# a file where a folder must be made (--out naming a file).
NEVER_RETRIED: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, PermissionError,
                                                  NotADirectoryError, IsADirectoryError, FileExistsError,
                                                  storage.UnusableURLError)
# botocore's, named rather than imported (botocore is heavy): no credentials is configuration, not weather.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")
# botocore's and aiohttp's, by name: the store's endpoint could not be reached at all.
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError")
_SHOWN = 8  # names listed in a message
S3_SETUP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL_S3 "
            "for an S3 store other than AWS")


class MissingCredentialsError(UserError):
    """No credentials (or no endpoint) for an ``s3://`` URL: the user's to set, never retried."""


def is_user_error(exc: BaseException) -> bool:
    """What the user must fix: reported in one line, never retried."""
    return isinstance(exc, NEVER_RETRIED) or _lacks_credentials(exc) or _unusable_model_file(exc)


# model's, named rather than imported (model/ loads torch): a file that is not a checkpoint, is corrupt
# or is for another backbone; ImageNet weights neither cached nor downloadable (offline) nor given.
_MODEL_FILE_ERRORS = {("model.checkpoint", "CheckpointError"), ("model.networks", "WeightsUnavailableError")}


def _unusable_model_file(exc: BaseException) -> bool:
    return any((t.__module__, t.__name__) in _MODEL_FILE_ERRORS for t in type(exc).__mro__)


def _lacks_credentials(exc: BaseException) -> bool:
    return any(t.__name__ in _NO_CREDENTIALS and t.__module__.startswith("botocore") for t in type(exc).__mro__)


def unreachable_line(exc: BaseException) -> str | None:
    """For a store's endpoint that could not be reached (a mistyped ``AWS_ENDPOINT_URL``, a server
    that is down, no network), after the client's own retries: the one line ``mpemd`` prints instead
    of a traceback; None for any other error. Retried like other weather (``is_retryable``)."""
    seen: BaseException | None = exc
    while seen is not None:  # the client's error, or what it was raised from
        if any(t.__name__ in _UNREACHABLE for t in type(seen).__mro__):
            return (f"cannot reach the storage endpoint: {seen} (check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL "
                    "and that the server is up)")
        seen = seen.__cause__ or seen.__context__
    return None


def is_retryable(exc: BaseException) -> bool:
    """False for what cannot succeed on a retry (see the module doc)."""
    if is_user_error(exc):
        return False
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))



def require_s3_credentials(url: str) -> None:
    """Raise ``MissingCredentialsError`` at once when nothing would authenticate a request for ``url``:
    no AWS variables, no credentials file, and botocore's chain (profiles, container, instance role)
    finds nothing."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if any(os.environ.get(n) for n in names):
        return
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(os.path.exists(os.path.expanduser(f)) for f in files):
        return
    import botocore.session  # the rest of the chain (instance role): asked only when nothing local is set

    if botocore.session.get_session().get_credentials() is None:
        raise MissingCredentialsError(f"no S3 credentials for {url}: {S3_SETUP}")


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task run unless its error cannot succeed."""
    try:
        state.result()
    except Exception as exc:  # the task's own error, re-raised by result()
        return is_retryable(exc)
    return False


def existing_near(url: str) -> str:
    """What exists where ``url`` was expected: the nearest existing folder and a few of its names,
    closest to the missing one first (a typo shows its fix)."""
    try:
        fs, path = storage.filesystem(url)
        missing = path.rstrip("/")
        parent = posixpath.dirname(missing)
        while parent and parent not in ("/", ".") and not fs.isdir(parent):
            missing, parent = parent, posixpath.dirname(parent)
        if not parent or not fs.isdir(parent):
            return "no parent folder exists"
        names = sorted(n for n in (posixpath.basename(p.rstrip("/")) for p in fs.ls(parent, detail=False))
                       if not n.startswith("."))
    except Exception as exc:  # the message must not fail: say why nothing is listed
        if unreachable_line(exc) is not None:  # (fsspec's HTTP exists() answers False for that too)
            return f"its server cannot be reached ({type(exc).__name__}: {str(exc)[:160]})"
        return f"cannot list its folder ({type(exc).__name__})"
    wanted = posixpath.basename(missing)  # the first missing segment: its typo is what to show
    close = difflib.get_close_matches(wanted, names, n=_SHOWN, cutoff=0.5)
    shown = close + [n for n in names if n not in close][: max(0, _SHOWN - len(close))]
    more = f" (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""
    where = storage.unstrip(fs, parent)
    return f"{where} holds: {', '.join(shown)}{more}" if names else f"{where} is empty"


def error_line(error: BaseException) -> str:
    """A user error as the one line ``mpemd`` prints after ``mpemd: error:``."""
    if isinstance(error, FileNotFoundError | PermissionError) and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    if _lacks_credentials(error):
        return f"{error} ({S3_SETUP})"
    return str(error) or type(error).__name__


def missing_path(what: str, url: str) -> MissingPathError:
    """``<what> <url> does not exist; <folder> holds: ...`` as an error to raise."""
    return MissingPathError(f"{what} {url} does not exist; {existing_near(url)}")
