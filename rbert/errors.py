"""The one exception type that ``run.py`` turns into a one-line error message."""


class ConfigError(ValueError):
    """Bad user input: a config option, a data file, a column, a label or a checkpoint.

    The message names the file, field or option at fault and fits on one line.
    """
