"""The one exception type meant for users.

Anything a user can cause (a missing file, a typo in a YAML key, a shape mismatch between
checkpoints) is raised as :class:`ExmeError` with a message that names the file, tensor or key
and says what to do. The CLI prints it on one line and exits with code 2; every other exception
is a bug in exme and keeps its traceback.
"""


class ExmeError(Exception):
    """A user mistake or bad input, explained in one actionable sentence."""
