"""Exceptions that the CLI turns into one line on stderr and exit code 2."""


class UserInputError(ValueError):
    """A file, flag or value given by the user is wrong. The message names it and the problem."""


class OutputExistsError(UserInputError):
    """The output already exists and overwriting was not asked for."""


def one_line(text: str) -> str:
    """`text` with its control characters escaped (a newline in a path becomes \\n), so a message
    naming any path stays one line on the terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
