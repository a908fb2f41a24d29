"""User-facing errors: one sentence naming the file, tensor or flag, and what to do."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message alone and exits with status 2."""
