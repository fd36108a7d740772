"""The one error base class: everything a user can fix (a bad job spec, a missing file, an output
another process holds) derives from :class:`ClipauditError`, so the command line catches it once
and exits 2 with its message, while programming errors keep their traceback."""


class ClipauditError(Exception):
    """An error in what the user gave or asked for; its message says what to change."""
