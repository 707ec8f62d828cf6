"""User-facing errors: one line that names the thing and says what to do."""


class UserError(Exception):
    """A mistake in the user's input (file, flag, config). The CLI prints it as one line, exit 2."""

    exit_code = 2


class OfflineError(UserError):
    """A model or file is not local and the hub cannot be reached."""
