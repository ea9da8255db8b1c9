"""User-facing errors.

Every error a user can cause is an `LmevalError`. Each message has the shape
``<where>: <what> must be <rule> (got <value>). <how to fix>``. The CLI prints these
without a traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import contextvars

# Set while the `lmeval` command runs: a fix is spelled the way its caller types it.
_ON_COMMAND_LINE = contextvars.ContextVar("lmeval_on_command_line", default=False)


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


def option(name: str) -> str:
    """How the caller spells the run option ``name`` (``overwrite``, ``fresh``) in a message:
    ``--overwrite`` on the command line; ``overwrite=True`` for a Python caller of `lmeval.run`,
    with the flag beside it for whoever runs the same folder from a shell."""
    flag = "--" + name.replace("_", "-")
    return flag if _ON_COMMAND_LINE.get() else f"{name}=True ({flag} on the command line)"


@contextlib.contextmanager
def on_command_line():
    """Within this block, messages spell options as command-line flags (see `option`)."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)
