"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


class RtexportError(Exception):
    """Base class: a problem with the user's inputs or environment, not a bug in rtexport."""

    exit_code = 2


class UnsupportedArchitecture(RtexportError):
    pass


class ModelLoadError(RtexportError):
    pass


class DataError(RtexportError):
    pass


class ArtifactMismatch(RtexportError):
    """An artifact (routers, plan, folder) was made for a different model or is incomplete."""


class ValidationFailed(RtexportError):
    """A parity or quality check missed its tolerance."""

    exit_code = 3


class MissingDependency(RtexportError):
    pass
