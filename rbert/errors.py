"""The one exception type that ``run.py`` turns into a one-line error message."""

import re


class ConfigError(ValueError):
    """Bad user input: a config option, a data file, a column, a label or a checkpoint.

    The message names the file, field or option at fault and fits on one line.
    """


def option_message(prefix: str, message: str) -> str:
    """A model's plain error message, with the config path of its object in front: a message that
    starts with one of its own fields (``exit_layers must ...``, ``pooling: ...``, ``ffn_rank=8 ...``)
    becomes ``<prefix>.exit_layers must ...``, any other ``<prefix>: ...``."""
    if re.match(r"[a-z_]+(:|=| must)", message):
        return f"{prefix}.{message}"
    return f"{prefix}: {message}"
