"""One exception type for every user-facing failure.

The CLI turns a :class:`DQToolError` into a single line on stderr and exit code 2,
so every message here must say what to change, not just what went wrong.
:class:`~dqtool.base.config_error.ConfigError` is the one for a bad config value.
"""


class DQToolError(Exception):
    """A bad input or a failed check that the user can fix.

    Example:
        >>> raise DQToolError("teacher folder 'x' has no config.json: pass a model folder")
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: teacher folder 'x' has no config.json: pass a model folder
    """

