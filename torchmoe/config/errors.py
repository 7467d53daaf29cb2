"""The one exception type for bad user input; the entry point prints it on one line, exit 2."""


class ConfigError(ValueError):
    """A problem with the job's configuration or its inputs, phrased for the user: it names the
    key, the value and the fix."""


def first_line(error: BaseException, limit: int = 120) -> str:
    """The first line of an error's message (its type's name when empty), cut to ``limit``
    characters: the reason inside a one-line ConfigError."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
