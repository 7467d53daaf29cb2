"""The one exception type for bad user input; the entry point prints it on one line, exit 2."""


class ConfigError(ValueError):
    """A problem with the job's configuration or its inputs, phrased for the user: it names the
    key, the value and the fix."""
