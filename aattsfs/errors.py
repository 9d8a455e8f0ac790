"""Errors a user can act on.

A `UserError` is printed as one line ("aattsfs: error: ...") and ends the
command with exit status 2. Anything else escaping the CLI is a bug.
"""


class UserError(Exception):
    exit_code = 2
