"""The exceptions users see: each message says what went wrong and what to do about it."""


class LoraMakerError(Exception):
    """A failure caused by input or environment, with an actionable one-line message."""


class Busy(LoraMakerError):
    """Refused because a job is running (on this project, or at all when only one job may run): the
    tab, the API (409) and the CLI all give this same message."""


class Stopped(LoraMakerError):
    """The user asked to stop."""
