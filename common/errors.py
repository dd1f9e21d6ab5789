"""User mistakes and bad files as exceptions: common.train.main() prints a UserError as one line
`<script>: error: <message>` (also into log.txt once the run has one) and exits with status 2, argparse's code;
anything else is a bug and keeps its traceback. Raise these wherever the fix is the user's (a flag, a missing or
bad file), with a message naming the flag or file, the cause and what to do.
"""
import os


class UserError(Exception):
    """A mistake the user can fix: a flag value, a file that is missing or unusable."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named, or the run needs, is not there (still a FileNotFoundError to callers)."""


class BadFileError(UserError, ValueError):
    """A file (checkpoint, image, annotation, pointer) that cannot be used; a ValueError for older callers."""


class Exit(SystemExit):
    """What main() raises for a UserError once it has printed the line: exit status 2; str() is the line."""

    def __init__(self, line):
        super().__init__(2)
        self.line = line

    def __str__(self):
        return self.line


def one_line(e):
    """The message of a UserError, also when a DataLoader worker re-raised it with the worker's traceback inside; a
    line break in it (a path the user named may hold one) shows as \\n, so that nothing after it is lost."""
    msg = str(e)
    if "Original Traceback" in msg:  # torch.utils.data's ExceptionWrapper: the last line is 'Type: message'
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return "\\n".join(msg.strip().splitlines()) if msg.strip() else type(e).__name__


def make_folder(path, flag):
    """os.makedirs(path, exist_ok=True); a folder that cannot be made (a file in the way, no permission, a read-only
    disk) is a UserError naming the flag, not an OSError traceback."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
        raise UserError(f"{flag} {path}: cannot create this folder ({why}): pass a writable folder") from None
