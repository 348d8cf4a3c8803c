"""Errors a user can act on, and the did-you-mean hint they carry.

A leaf module: every layer (recipe parsing, registries, trainers, checkpoints, CLI)
raises these, and none of them imports anything from the project.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def warn_renamed(old: str, new: str) -> None:
    """One stderr line for a deprecated recipe key still given (by the first process only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"recipe: {old} is deprecated, use {new} (the old key goes in the next release)", file=sys.stderr)


class RecipeError(ValueError):
    """A recipe problem the user can fix; ``str(err)`` is the one-line message
    ``recipe error: <key>: <what is wrong>`` and the CLI exits with status 2."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"recipe error: {key}: {problem}")


class RegistryError(ValueError):
    """An unknown name, an unimportable ``module:attr`` or a keyword the target does
    not accept; ``str(err)`` is one line. Recipe validation re-raises it as a
    ``RecipeError`` naming the recipe key."""


class RewardError(ValueError):
    """A reward function failed or returned something unusable; one line naming the
    reward and what it returned. The run stops before anything is saved."""
