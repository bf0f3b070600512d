"""User-facing errors: one line naming the problem and the fix. The CLI maps them to exit codes."""

from __future__ import annotations


class FeatureLensError(Exception):
    """A failure the user can fix: damaged or unreadable input, an output in use, a run that cannot
    continue. The CLI prints it as one line and exits with :attr:`exit_code` (1)."""

    exit_code = 1


class UsageError(FeatureLensError):
    """The command itself is wrong: a flag out of range, a path that does not exist, an output that
    already holds something. Nothing has been written. Exit code 2, like argparse's own errors."""

    exit_code = 2
