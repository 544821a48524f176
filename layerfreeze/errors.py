"""Exception types for user input: one ``ConfigError`` carrying every problem found."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more problems in user configuration, reported together on one line.

    Each entry follows ``<config path>: <what is wrong>, got <value>. <how to fix>.``
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:  # one line (the CLI's user-error contract), every problem numbered
            msg = f"{len(self.problems)} configuration problems: " + " ".join(
                f"({i}) {p}" for i, p in enumerate(self.problems, 1)
            )
        super().__init__(msg)
