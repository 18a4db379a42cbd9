"""The one exception type users see: its message says what went wrong and what to do about it."""


class LoraMakerError(Exception):
    """A failure caused by input or environment, with an actionable one-line message."""
