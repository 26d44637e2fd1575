"""The exceptions that the CLI turns into a single line and a non-zero exit; warnings and bad
command lines as one line too."""

import argparse
from typing import NoReturn


class MetarunError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it, in one line.
    The CLI exits with `exit_code`: 2, a command that cannot run as given."""

    exit_code = 2


class RunFailed(MetarunError):
    """A run that had started and cannot go on (its numbers diverged, a write failed): exit code 1.
    Its checkpoints are the last good ones."""

    exit_code = 1


def warnings_as_lines(prog: str) -> None:
    """Show warnings (a class left out, an unreadable file) as `prog: warning: ...`, one line each,
    instead of Python's file:line report with a source line."""
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {message}\n"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line as one line, `prog: error: problem; see prog --help`, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
