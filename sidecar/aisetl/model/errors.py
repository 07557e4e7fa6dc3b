"""The one error hierarchy of aisetl.

Every error knows the HTTP status it maps to and whether retrying can help, and
carries context (bucket, object, ETL ID, target). Handlers raise these; one
middleware (``observability.http``) turns them into JSON responses, so no
handler picks a status code by hand. Causes are chained with ``raise ... from``.
"""

from __future__ import annotations

from typing import Any


class AisError(Exception):
    """Base of every error that aisetl reports to a user."""

    status: int = 500
    retryable: bool = False

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "error": type(self).__name__,
                               "message": self.message}
        if self.context:
            out["context"] = self.context
        return out

    def __str__(self) -> str:
        return self.message


class InvalidRequest(AisError):
    """The request is malformed; the message names the field and the fix."""

    status = 400


class InvalidName(InvalidRequest):
    """A bucket or object name that cannot be stored."""


class InvalidSpec(InvalidRequest):
    """An ETL declaration (init spec or build request) that cannot run."""


class NotFound(AisError):
    status = 404


class BucketNotFound(NotFound):
    pass


class ObjectNotFound(NotFound):
    pass


class EtlNotFound(NotFound):
    pass


class XactionNotFound(NotFound):
    pass


class Conflict(AisError):
    status = 409


class BucketExists(Conflict):
    pass


class EtlExists(Conflict):
    pass


class Unavailable(AisError):
    """Something is not there yet (no targets, transformer not ready): try again."""

    status = 503
    retryable = True


class EtlFailed(AisError):
    """A transformer could not start: the declaration cannot run as given
    (its code or image crashed, its dependencies did not install)."""

    status = 422


class TransformError(AisError):
    """The user's transform failed on one object."""

    status = 500


class UpstreamError(AisError):
    """A peer (target, transformer, engine) misbehaved; may pass on retry."""

    status = 502
    retryable = True


class EtlTimeout(AisError):
    """A transformer did not become ready within ``wait_timeout``."""

    status = 504
