"""User mistakes and bad files: one line naming the flag or file, the cause and what to do; main() prints it alone.

Raise UserError (or BadFileError for a file that cannot be used) with that line; common.train.main turns it into
`error: <line>` on stderr and exit status 1, without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass


class BadFileError(UserError, ValueError):
    """A file (checkpoint, image, annotation, pointer) that cannot be used; a ValueError for older callers."""


def one_line(e):
    """The message of a UserError, also when a DataLoader worker re-raised it with the worker's traceback inside."""
    msg = str(e)
    if "Original Traceback" in msg:  # torch.utils.data's ExceptionWrapper: the last line is 'Type: message'
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
