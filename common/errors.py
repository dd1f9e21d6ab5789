"""User mistakes as exceptions: common.train.main() prints a UserError as one line `<script>: error: <message>`
(also into log.txt once the run has one) and exits with status 2, argparse's code; anything else is a bug and
keeps its traceback. Raise these wherever the fix is the user's (a flag, a missing or bad file), with a message
naming the flag or file and what to do.
"""


class UserError(Exception):
    """A mistake the user can fix: a flag value, a file that is missing or unusable."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named, or the run needs, is not there (still a FileNotFoundError to callers)."""
