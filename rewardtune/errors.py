"""User-facing errors: one line that names the thing and says what to do."""


class UserError(Exception):
    """A mistake in the user's input (file, flag, config). The CLI prints it as one line, exit 2."""

    exit_code = 2


class OfflineError(UserError):
    """A model or file is not local and the hub cannot be reached."""


def check_all(*checks) -> None:
    """Run every check (each a callable that raises ``UserError`` for one problem) and raise one ``UserError``
    naming every problem found, so that a user mends them in one go, not one per run."""
    problems: list[UserError] = []
    for check in checks:
        try:
            check()
        except UserError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        # problems that end in the same advice ('...; download it where ...') give it once, after the last of them
        groups: dict[str, list[str]] = {}
        for p in map(str, problems):
            head, _, advice = p.rpartition("; ") if "; " in p else (p, "", "")
            groups.setdefault(advice, []).append(head)
        said = "; ".join("; ".join(heads) + (f"; {advice}" if advice else "") for advice, heads in groups.items())
        kind = OfflineError if all(isinstance(p, OfflineError) for p in problems) else UserError
        raise kind(f"{len(problems)} problems: {said}")
