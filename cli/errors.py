"""The one error every command raises for a clear one-line answer."""


class CommandError(Exception):
    """Printed as one line, exit status 1."""
