"""The error of the fault runs (``make chaos``, tests/resilience): a run that cannot go on."""


class ChaosError(RuntimeError):
    """A scenario could not be set up (no export, server did not start); the message says why."""
