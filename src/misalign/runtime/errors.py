"""The one error every layer raises for bad input: one line naming the field, exit 2."""


class ConfigError(ValueError):
    """A configuration problem, as one line naming the field."""
