"""The one base class of the errors a user can act on, which the CLI prints as one line."""


class TTTError(Exception):
    """Bad input or an unreachable dependency; the message names the file, field or endpoint.

    Every stage's own error derives from it, so the `ttt` command reports any of them the
    same way (one line, exit status 1) and lets anything else surface as a bug.
    """
