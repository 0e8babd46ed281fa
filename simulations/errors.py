"""Bad input from the user, shared by every ``fedsam`` subcommand."""


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2."""
