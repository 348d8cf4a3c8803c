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


def move_renamed(data: dict, renamed: dict[str, str], prefix: str) -> dict:
    """A copy of the recipe mapping ``data`` (at key ``prefix``) with each deprecated key of ``renamed``
    (old -> new; the new one may be a dotted path into a nested mapping) moved to its new place, one
    ``warn_renamed`` line each; an old key given with its new one is a RecipeError."""
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        old_full, new_full = f"{prefix}.{old}" if prefix else old, f"{prefix}.{new}" if prefix else new
        *parents, leaf = new.split(".")
        node = data
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: depth + 1])
                raise RecipeError(f"{prefix}.{where}" if prefix else where, "expected a mapping")
            node[part] = child = dict(child)
            node = child
        if leaf in node:
            raise RecipeError(old_full, f"is the deprecated name of {new_full}; give only {new_full}")
        warn_renamed(old_full, new_full)
        node[leaf] = data.pop(old)
    return data


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
