"""Errors a user can act on. CLIs print them as one clear line and exit non-zero (no traceback)."""

import difflib


class AdaskipError(Exception):
    """Base class: the message is meant for the user and names what to do."""


class ModelLoadError(AdaskipError):
    """The model source is missing, unreadable or of an unsupported architecture."""


class PlanError(AdaskipError):
    """A skip plan is malformed, of another format version, or does not match the model."""


class EngineDirError(AdaskipError):
    """An engine directory is missing, corrupt or was built for something else."""


class InputError(AdaskipError):
    """A request cannot be served as given (empty prompt, over the context limit, bad sampling option)."""


def check_choice(value: object, choices: tuple, what: str, error: type[AdaskipError] = InputError) -> None:
    """The one message for a value outside its choices (a flag, a plan field): what, the choices, what was given."""
    if value not in choices:
        raise error(f"{what} must be one of {', '.join(map(str, choices))}; got {value!r}{did_you_mean(value, choices)}")


def did_you_mean(value: object, choices: tuple | list) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a misspelled `value`, or "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
