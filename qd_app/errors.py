"""Errors a user can act on. Each message names what was wrong and what is allowed."""


class UserFacingError(Exception):
    """Base of the errors that stop a run with one clear message."""


class ConfigError(UserFacingError, ValueError):
    """A setting has a value the app cannot use."""


class DatasetUnavailableError(UserFacingError, RuntimeError):
    """A dataset is not on disk and none of its sources could provide it."""


class FederationError(UserFacingError, RuntimeError):
    """The connected nodes cannot form the federation the run needs."""


class StageFailedError(UserFacingError, RuntimeError):
    """No client could do the work of a round; the message carries their reasons."""


class StoreError(UserFacingError, RuntimeError):
    """A client's synthetic store is missing, corrupt, or belongs to another setup."""


class RequestError(UserFacingError, ValueError):
    """An unlearning or relearning request cannot be served as asked."""


class LedgerError(UserFacingError, RuntimeError):
    """A request cannot be recorded as asked (unknown id, already served, another run serving)."""
