"""Typed errors raised by the vlkit API; the CLI maps each to a one-line message and exit code 2."""

from __future__ import annotations


class VlkitError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, incompatible adapter)."""

    exit_code = 2
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        message, self.worker_traceback = _from_worker(type(self), message)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def _from_worker(cls: type, message: str) -> tuple[str, str | None]:
    """(the message, the worker's traceback) of an error a DataLoader worker raised: torch re-raises it in the
    main process as `cls("Caught X in DataLoader worker process N.\nOriginal Traceback ...")`; the user sees
    the original one line (the traceback is kept for VLKIT_DEBUG=1)."""
    if not isinstance(message, str) or not message.startswith("Caught ") or WORKER_TRACEBACK not in message:
        return message, None
    tail = message.rstrip()
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = tail.rfind("\n" + name)
        if at >= 0:
            return tail[at + 1 + len(name) :].strip(), message
    return tail.splitlines()[-1].strip(), message


class ConfigError(VlkitError):
    """A bad option value, unknown key, wrong type in a recipe or command-line option."""

    kind = "bad config"


class UnknownNameError(VlkitError):
    """A name that no registered plugin provides (backbone, variant, task, dataset, probe, exporter)."""

    kind = "unknown name"

    def __init__(self, what: str, name: str, known: list[str] | tuple[str, ...] = ()):
        known_txt = ", ".join(sorted(known)) if known else "none registered"
        super().__init__(f"unknown {what} {name!r}; known: {known_txt}")
        self.what, self.name, self.known = what, name, list(known)


class PluginError(VlkitError):
    """A plugin failed to load or two plugins registered the same name."""

    kind = "plugin error"


class BackboneLoadError(VlkitError):
    """Weights or configuration for a backbone cannot be found or read."""

    kind = "backbone"


class AdapterFileError(VlkitError):
    """An adapter directory is missing files, corrupt, or not a vlkit adapter."""

    kind = "adapter file"


class IncompatibleAdapterError(VlkitError):
    """An adapter does not match the backbone (architecture fingerprint, shapes, variant)."""

    kind = "incompatible adapter"


class DataError(VlkitError):
    """A dataset row, image file or manifest cannot be used."""

    kind = "data"


class InjectionError(VlkitError):
    """Adapter injection found nothing to target, or a target cannot be wrapped."""

    kind = "injection"


class ExportError(VlkitError):
    """An export target failed, or an exported graph does not compute what the PyTorch model computes.

    `summary` carries the verification results gathered before the failure (for the CLI's table)."""

    kind = "export"

    def __init__(self, message: str, *, hint: str | None = None, summary: dict | None = None):
        super().__init__(message, hint=hint)
        self.summary = summary


class RequestError(VlkitError):
    """A request to `vlkit serve` that cannot be answered as sent (bad JSON, field, image, adapter); `status` is
    the HTTP status the server answers with (400 unless another fits better: 404, 409, 413, 422)."""

    kind = "bad request"

    def __init__(self, message: str, *, status: int = 400, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = int(status)


class OverloadedError(VlkitError):
    """`vlkit serve` has as many requests waiting as its bounded queue holds (HTTP 429 with Retry-After)."""

    kind = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = float(retry_after)


class MissingDependencyError(VlkitError):
    """An optional dependency a feature needs is not installed (e.g. Ray Serve for `vlkit serve --cluster ray`)."""

    kind = "missing dependency"

    def __init__(self, message: str, *, package: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.package = package


class VlkitWarning(UserWarning):
    """Something that runs but probably not as meant (e.g. class names the tokenizer does not know); the CLI
    prints each as one `warning: ...` line."""
