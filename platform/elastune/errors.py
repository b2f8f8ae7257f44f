"""One error hierarchy for everything a user can get wrong or a run can hit.

Messages state what is wrong, the value, the rule and the fix. Errors cross Ray process
boundaries (a worker raises, the driver reports), so each one pickles by its message.
"""

from __future__ import annotations


class ElastuneError(Exception):
    """Base of every error Elastune raises on purpose.

    `user_error` marks mistakes in input (spec, arguments, files): the CLI prints the message
    alone and exits with code 2. Other errors are failures of a run (exit code 1).
    """

    user_error = True

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[ElastuneError], tuple[str]]:
        # Ray pickles exceptions across processes; keep only the message so subclasses with
        # other constructor signatures still round-trip.
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message

    @property
    def exit_code(self) -> int:
        """What the CLI exits with: 2 for a mistake in input, 1 for a failure."""
        return 2 if self.user_error else 1


class SpecError(ElastuneError):
    """The job spec is invalid: a field breaks a rule."""


class BatchPlanError(ElastuneError):
    """The global batch cannot be split over this world size."""


class DataError(ElastuneError):
    """A dataset is missing, malformed or does not match its manifest."""


class CheckpointError(ElastuneError):
    """A checkpoint cannot be written or read: it is corrupt, incomplete or out of place."""

    user_error = False


class IncompatibleCheckpoint(ElastuneError):
    """A valid checkpoint that does not fit this job (another model's tensors or shapes). Not
    corrupt: nothing falls back past it, and nothing overwrites it without --fresh."""


class StorageError(ElastuneError):
    """A checkpoint location that cannot be used: an unknown scheme, a malformed URI, a store
    that cannot be reached, a root that does not exist where one must."""


class LeaseHeld(ElastuneError):
    """Another run holds the checkpoint root (one root, one writer)."""


class Unreachable(ElastuneError):
    """No Ray Jobs API answers at the address a command was given."""

    exit_code = 3


class Refused(ElastuneError):
    """The Ray cluster refused the request's credentials (its token)."""

    exit_code = 4
