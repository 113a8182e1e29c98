"""The one exception type for errors a user can cause.

Raise ``QBHeatError`` with one sentence that says what happened and what to do. Both CLIs print
it without a traceback and exit with status 2. Programming errors stay ordinary exceptions.
"""


class QBHeatError(Exception):
    """A problem with the user's input, files or environment, explained in one sentence."""
