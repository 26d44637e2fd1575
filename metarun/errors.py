"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class MetarunError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it, in one line."""


def warnings_as_lines(prog: str) -> None:
    """Show warnings (a class left out, an unreadable file) as `prog: warning: ...`, one line each,
    instead of Python's file:line report with a source line."""
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {message}\n"
