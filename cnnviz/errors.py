"""The one error family cnnviz raises for problems a user can fix.

The CLI catches `CnnvizError`, prints its message as one line per problem and exits with code 2.
"""


class CnnvizError(Exception):
    """A problem with the user's input (a file, a value, a choice), stated so it can be fixed."""


class ConfigError(CnnvizError):
    """A config file or `--set` override that cannot be loaded or validated."""


class CnnvizWarning(UserWarning):
    """Something the user should know that does not stop the work (printed as one line)."""


class CnnvizNotice(CnnvizWarning):
    """A choice cnnviz made for the user that they should know about (printed as `note:`)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-blank line of an exception's message (at most `limit` characters), or its
    type's name when the message is empty: how a library's long error becomes one line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__
