"""User-facing errors.

Every error a user can cause is an `LmevalError`. Each message has the shape
``<where>: <what> must be <rule> (got <value>). <how to fix>``. The CLI prints these
without a traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LmevalError(Exception):
    """Base class for errors caused by the user's input, config, data or environment."""


class ConfigError(LmevalError):
    """A config file or override is malformed; the message lists every problem found."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{head}{len(self.problems)} problems found:\n{listed}"
        super().__init__(message)


class DataError(LmevalError):
    """A corpus, document or text cannot be scored as given."""


class ModelError(LmevalError):
    """A model or tokenizer cannot be loaded or does not fit the requested protocol."""


class OutputError(LmevalError):
    """An output directory or file cannot be written."""
