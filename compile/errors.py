"""Errors of the compile stage a user can act on (kept free of TVM imports: the CLI loads
this module for every verb)."""


class ToolchainError(RuntimeError):
    """A compiler or target that is missing or unknown; the message says what to install."""
