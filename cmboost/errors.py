"""Exceptions that the CLI turns into one line on stderr and exit code 2."""


class UserInputError(ValueError):
    """A file, flag or value given by the user is wrong. The message names it and the problem."""


class OutputExistsError(UserInputError):
    """The output already exists and overwriting was not asked for."""
