"""A bad config value, worded with the name the user wrote for it (flag or recipe key)."""

import re

from dqtool.base.errors import DQToolError


_FIELD = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class ConfigError(DQToolError):
    """A bad value of a config field, worded with the name the user wrote for it.

    The message is a template whose ``{field}`` placeholders are config field names. It
    reads as command-line flags by default (``--field-name``, or the flag ``flags`` gives
    where the two differ); a caller that knows the value came from elsewhere re-words it
    with :meth:`named` — the recipe loader names the recipe key.

    Example:
        >>> e = ConfigError("{runs} must be at least 1, got 0")
        >>> str(e)
        '--runs must be at least 1, got 0'
        >>> str(e.named(lambda field: "bench." + field))
        'bench.runs must be at least 1, got 0'
        >>> str(ConfigError("{learning_rate} must be > 0", flags={"learning_rate": "--lr"}))
        '--lr must be > 0'
    """

    def __init__(self, template: str, flags: dict[str, str] | None = None):
        self.template, self.flags = template, dict(flags or {})
        super().__init__(self._render(self.flag))

    def flag(self, field: str) -> str:
        """The command-line flag of ``field``."""
        return self.flags.get(field, "--" + field.replace("_", "-"))

    def _render(self, name) -> str:
        return _FIELD.sub(lambda m: name(m.group(1)), self.template)

    def named(self, name) -> DQToolError:
        """The same error with every field named by ``name(field)``."""
        return DQToolError(self._render(name))
