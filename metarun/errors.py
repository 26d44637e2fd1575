"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class MetarunError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it, in one line."""
