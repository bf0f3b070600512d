"""One exception type for problems the user can fix; its message is one line naming problem and fix."""

from __future__ import annotations


class FeatureLensError(Exception):
    """A user-facing error: bad input, missing file, incompatible store. The CLI prints it as one line."""
