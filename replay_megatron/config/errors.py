"""ConfigError: every config mistake, one line per problem, naming the file, the dotted key and the value."""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One mistake at dotted `key` (e.g. `optimizer.max_angle`); `value` is shown when `has_value`."""

    key: str
    message: str
    value: Any = None
    has_value: bool = True


class ConfigError(ValueError):
    """An invalid config. `problems` holds one formatted line per mistake; `str()` is the full report.

    `causes` keeps the unformatted `Problem`s when the raiser has them, so a caller can re-attribute them.
    """

    def __init__(self, problems: list[str], header: str = "invalid config", causes: Iterable[Problem] = ()) -> None:
        self.problems = list(problems)
        self.header = header
        self.causes = list(causes)
        super().__init__(f"{header}:\n" + "\n".join(f"  {p}" for p in self.problems))


    @classmethod
    def of(cls, problems: list[Problem], header: str = "invalid config") -> ConfigError:
        """A ConfigError from unattributed problems (no file known)."""
        return cls([format_problem(p, "") for p in problems], header, causes=problems)


def format_problem(problem: Problem, origin: str) -> str:
    """`key = value (origin): message`, the one-line form of a problem."""
    value = f" = {problem.value!r}" if problem.has_value else ""
    where = f" ({origin})" if origin else ""
    return f"{problem.key}{value}{where}: {problem.message}"


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `valid` to `key` (difflib), or '' when none is close."""
    close = difflib.get_close_matches(key, list(valid), n=3)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
