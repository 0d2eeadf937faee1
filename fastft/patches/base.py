"""The patch primitive: explicit, idempotent, reversible, version-guarded attribute replacement.

A :class:`Patch` names its target (an object -- module, class or instance -- and an attribute), the upstream versions
it was written against, and a guard that checks the target still looks as expected (e.g. the signature of the method
it replaces). ``apply()`` either installs the replacement and records it, or -- when the version is outside the range
or the guard fails -- warns once and leaves the target untouched, so a user's run never breaks because upstream moved.
``fastft.unpatch()`` (:func:`revert_all`) restores every applied patch, newest first.

No source text is rewritten or exec'd, nothing is written to disk, nothing happens at import time.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fastft._log import logger, warn_once

_MISSING = object()

#: Applied patches in order; revert_all() walks it backwards.
_APPLIED: list[Patch] = []


def _installed_version(package: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problem(requires: dict[str, str]) -> str | None:
    """None if every ``package: specifier`` holds, else a sentence saying which does not."""
    for package, spec in requires.items():
        have = _installed_version(package)
        if have is None:
            return f"{package} is not installed"
        if have not in SpecifierSet(spec):
            return f"{package} {have} is outside the tested range {spec}"
    return None


def signature_guard(*expected: str) -> Callable[[Any], str | None]:
    """A guard that passes when the target callable's parameter names are exactly ``expected`` (in order)."""

    def guard(original: Any) -> str | None:
        try:
            names = tuple(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            return "its signature cannot be read"
        if names != tuple(expected):
            return f"its signature changed: expected ({', '.join(expected)}), found ({', '.join(names)})"
        return None

    return guard


def resolve(target: Any) -> Any:
    """``"pkg.module:Attr.sub"`` or ``"pkg.module"`` -> the object; objects are returned as they are."""
    if not isinstance(target, str):
        return target
    module_name, _, attr_path = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr_path.split(".")):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(eq=False)
class Patch:
    """Replace ``owner.attribute`` with ``replacement``.

    Attributes:
        name: what the patch does, for logs and warnings.
        owner: the object holding the attribute, or a ``"module:Qualified.name"`` string resolved at apply time.
        attribute: the attribute name.
        replacement: the new value, or -- with ``wrap=True`` -- a function ``original -> new value``.
        requires: ``{package: specifier}`` the patch was written against, e.g. ``{"trl": ">=1.16,<1.17"}``.
        guard: ``original -> None | reason``; a reason leaves the target unpatched with one warning.
        wrap: call ``replacement(original)`` to build the new value.
    """

    name: str
    owner: Any
    attribute: str
    replacement: Any
    requires: dict[str, str] = dataclasses.field(default_factory=dict)
    guard: Callable[[Any], str | None] | None = None
    wrap: bool = False
    # filled in by apply()
    _owner_obj: Any = dataclasses.field(default=None, repr=False)
    _original: Any = dataclasses.field(default=_MISSING, repr=False)
    _had_own: bool = dataclasses.field(default=False, repr=False)
    _installed: Any = dataclasses.field(default=_MISSING, repr=False)

    @property
    def applied(self) -> bool:
        return self in _APPLIED

    def apply(self) -> bool:
        """Install the replacement; True if installed (or already), False if skipped with a warning."""
        if self.applied:
            return True
        try:
            owner = resolve(self.owner)
        except (ImportError, AttributeError) as exc:
            warn_once(f"fastft: not applying '{self.name}': target {self.owner!r} not found ({exc})", key=self.name)
            return False
        original = _own_or_inherited(owner, self.attribute)
        if original is _MISSING:
            warn_once(f"fastft: not applying '{self.name}': {owner!r} has no attribute {self.attribute!r}",
                      key=self.name)
            return False
        problem = version_problem(self.requires) or (self.guard(original) if self.guard else None)
        if problem:
            warn_once(f"fastft: not applying '{self.name}' ({problem}); that piece stays unpatched and runs as "
                      "upstream wrote it", key=self.name)
            return False
        self._owner_obj = owner
        self._original = original
        self._had_own = _has_own(owner, self.attribute)
        self._installed = self.replacement(original) if self.wrap else self.replacement
        setattr(owner, self.attribute, self._installed)
        _APPLIED.append(self)
        logger.debug("fastft: applied %s", self.name)
        return True

    def revert(self) -> None:
        """Restore the original; a no-op if not applied."""
        if not self.applied:
            return
        owner = self._owner_obj
        if self._had_own:
            setattr(owner, self.attribute, self._original)
        else:
            # It was inherited (or a class-level default seen through an instance): remove our own entry.
            try:
                delattr(owner, self.attribute)
            except AttributeError:
                pass
        _APPLIED.remove(self)
        logger.debug("fastft: reverted %s", self.name)

    @property
    def original(self) -> Any:
        return None if self._original is _MISSING else self._original


def _has_own(owner: Any, attribute: str) -> bool:
    if inspect.isclass(owner) or inspect.ismodule(owner):
        return attribute in vars(owner)
    # nn.Module keeps submodules/parameters/buffers in its own dicts, not in __dict__
    return attribute in getattr(owner, "__dict__", {}) or any(
        attribute in getattr(owner, store, {}) for store in ("_modules", "_parameters", "_buffers"))


def _own_or_inherited(owner: Any, attribute: str) -> Any:
    if inspect.isclass(owner):
        for klass in owner.__mro__:
            if attribute in vars(klass):
                return vars(klass)[attribute]
        return _MISSING
    return getattr(owner, attribute, _MISSING)


def apply_all(patches: Iterable[Patch]) -> list[Patch]:
    """Apply each patch; return those that were installed."""
    return [p for p in patches if p.apply()]


def applied_patches() -> list[Patch]:
    return list(_APPLIED)


def revert_all() -> int:
    """Revert every applied patch, newest first; returns how many were reverted."""
    count = 0
    while _APPLIED:
        _APPLIED[-1].revert()
        count += 1
    return count
