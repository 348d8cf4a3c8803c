"""One registry idiom for every pluggable thing: trainers, rewards, regularizers,
schedules, zoo models, env classes and wrappers.

A spec is a registered name or ``"module:attr"``; keyword arguments are checked
against the target's signature before anything is called, and every failure is one
line with a did-you-mean (``RegistryError``). Built-in entries may be *lazy*: the
registry knows the module that registers them and imports it on first lookup, so
listing or validating never imports a heavy module that is not used.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from rlprox.errors import RegistryError, did_you_mean


def resolve_object(spec: str, kind: str = "object") -> Any:
    """Import ``"module:attr"`` (``attr`` may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RegistryError(f"expected 'module:Name' for a {kind} (got {spec!r})")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise RegistryError(f"cannot import module {module_name!r} ({err})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def check_kwargs(
    target: Callable, kwargs: dict, label: str, reserved: tuple[str, ...] = (), require: bool = True
) -> None:
    """Raise ``RegistryError`` when ``target`` does not take every key of ``kwargs``
    (``reserved`` parameters are supplied by the caller, never by the user) or, with
    ``require``, when a parameter without a default is missing."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [k for k, p in params.items() if k not in reserved and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in kwargs:
        if key in reserved or (not takes_any and key not in params):
            raise RegistryError(
                f"{label}: unknown option {key!r}{did_you_mean(key, accepted)}; "
                f"options: {', '.join(accepted) or 'none'}"
            )
    if require:
        missing = [
            k for k in accepted if params[k].default is inspect.Parameter.empty and k not in kwargs and k != "self"
        ]
        if missing:
            raise RegistryError(f"{label}: missing required option {missing[0]!r}")


class Registry:
    """Names -> objects of one kind (``kind`` appears in error messages)."""

    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._descriptions: dict[str, str] = {}
        self._lazy = dict(lazy or {})  # name -> module whose import registers it

    # ------------------------------------------------------------------ registration
    def register(self, name: str, obj: Any = None, description: str | None = None):
        """``registry.register("name", obj)``, or as a decorator ``@registry.register("name")``."""

        def add(target):
            if name in self._entries and self._entries[name] is not target:
                existing = self._entries[name]
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered ({getattr(existing, '__module__', existing)})"
                )
            self._entries[name] = target
            if description is not None:
                self._descriptions[name] = description
            return target

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._descriptions.pop(name, None)

    # ------------------------------------------------------------------ lookup
    def _load(self, name: str) -> None:
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> Any:
        self._load(name)
        return self._entries[name]

    def items(self):
        return [(n, self[n]) for n in self.names()]

    def describe(self) -> dict[str, str]:
        """{name: one-line description}: the registered description, else the first
        docstring line. Loads lazy entries."""
        out = {}
        for name in self.names():
            obj = self[name]
            doc = self._descriptions.get(name) or (inspect.getdoc(obj) or "").split("\n")[0]
            out[name] = doc
        return out

    def get(self, spec: str) -> Any:
        """The object registered as ``spec``, or imported from ``"module:attr"``."""
        if not isinstance(spec, str) or not spec:
            raise RegistryError(f"{self.kind} must be a name or 'module:attr' (got {spec!r})")
        if ":" in spec:
            return resolve_object(spec, self.kind)
        if spec in self:
            return self[spec]
        known = self.names()
        raise RegistryError(
            f"unknown {self.kind} {spec!r}{did_you_mean(spec, known)}; known: {', '.join(known)}, or 'module:attr'"
        )

    def build(self, spec: str, kwargs: dict | None = None, reserved: tuple[str, ...] = ()) -> Any:
        """``get(spec)(**kwargs)`` after checking ``kwargs`` against its signature."""
        target = self.get(spec)
        kwargs = dict(kwargs or {})
        check_kwargs(target, kwargs, f"{self.kind} {spec!r}", reserved)
        try:
            return target(**kwargs)
        except TypeError as err:
            raise RegistryError(f"{self.kind} {spec!r}: {str(err).splitlines()[0]}") from None

    def bind(self, spec: str, kwargs: dict | None = None, reserved: tuple[str, ...] = ()) -> Callable:
        """``get(spec)`` with ``kwargs`` bound (checked now, applied on every call);
        ``reserved`` are the arguments the caller passes at call time."""
        target = self.get(spec)
        if not callable(target):
            raise RegistryError(f"{self.kind} {spec!r} is not callable")
        kwargs = dict(kwargs or {})
        check_kwargs(target, kwargs, f"{self.kind} {spec!r}", reserved, require=False)
        return functools.partial(target, **kwargs) if kwargs else target
