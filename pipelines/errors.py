"""One exception family for bad input.

The CLI prints a `UserError` as one line and exits with status 2; the app shows it in the page.
Messages name the argument, show the bad value and say what to do.
"""


class UserError(Exception):
    """Bad input from the person using Menagerie: a missing file, an unknown concept, a bad box."""


class Cancelled(Exception):
    """A long job (training, fusion, sampling) was stopped through its cancel event."""
