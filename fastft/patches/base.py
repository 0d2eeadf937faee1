"""The patch primitive: explicit, idempotent, reversible, contract-guarded attribute replacement.

A :class:`Patch` names its target (an object -- module, class or instance -- and an attribute), the packages whose
tested range (:mod:`fastft.versions`) it was written against, and a guard that checks the *contract* the replacement
relies on (the parameters it reads, the attributes it uses, and for a pure function a numerical probe, original vs
replacement, on a tiny CPU tensor). A version number is never the reason to refuse: ``apply()`` installs the
replacement when the contract holds -- outside the tested range with one line saying so -- and when it fails warns once
and leaves the target untouched, so a user's run never breaks because upstream moved.
``fastft.unpatch()`` (:func:`revert_all`) restores every applied patch, newest first.

No source text is rewritten or exec'd, nothing is written to disk, nothing happens at import time.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from fastft._log import info_once, logger, warn_once
from fastft.versions import untested_note

_MISSING = object()

#: Applied patches in order; revert_all() walks it backwards.
_APPLIED: list[Patch] = []

#: Patch name -> why it was last left unpatched (for ``fastft doctor`` and the training summary).
_SKIPPED: dict[str, str] = {}


def parameters_guard(*needed: str, var_keyword: bool = False) -> Callable[[Any], str | None]:
    """A guard that passes when the target callable takes every parameter in ``needed`` (by name, any order, others
    allowed) and, with ``var_keyword``, a ``**kwargs`` -- the contract of a wrapper that reads those parameters and
    passes everything else through untouched."""

    def guard(original: Any) -> str | None:
        try:
            params = inspect.signature(original).parameters
        except (TypeError, ValueError):
            return "its signature cannot be read"
        missing = [name for name in needed if name not in params]
        if missing:
            return f"it no longer takes {', '.join(missing)} (signature: ({', '.join(params)}))"
        if var_keyword and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return f"it no longer takes **kwargs (signature: ({', '.join(params)}))"
        return None

    return guard


def all_guards(*guards: Callable[[Any], str | None] | None) -> Callable[[Any], str | None]:
    """The first problem any of ``guards`` finds (an exception inside a guard is a problem, not a crash)."""

    def guard(original: Any) -> str | None:
        for check in guards:
            if check is None:
                continue
            try:
                problem = check(original)
            except Exception as exc:  # noqa: BLE001 - a contract we cannot check is a contract that does not hold
                problem = f"its contract check failed ({type(exc).__name__}: {exc})"
            if problem:
                return problem
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
        tested: packages whose declared range (``fastft.versions``) the patch was tested against; outside it the
            patch still applies when its guard passes, with one info line per package saying it is untested.
        guard: ``original -> None | reason``: the contract the replacement relies on; a reason leaves the target
            unpatched with one warning.
        wrap: call ``replacement(original)`` to build the new value.
        create: the attribute may not exist yet (a marker fastft adds); revert() removes it again.
    """

    name: str
    owner: Any
    attribute: str
    replacement: Any
    tested: tuple[str, ...] = ()
    guard: Callable[[Any], str | None] | None = None
    wrap: bool = False
    create: bool = False
    # filled in by apply()
    _owner_obj: Any = dataclasses.field(default=None, repr=False)
    _original: Any = dataclasses.field(default=_MISSING, repr=False)
    _had_own: bool = dataclasses.field(default=False, repr=False)
    _installed: Any = dataclasses.field(default=_MISSING, repr=False)
    #: why the last apply() left the target unpatched (None after a successful apply)
    problem: str | None = dataclasses.field(default=None, repr=False)

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
            return self._skip(f"target {self.owner!r} not found ({exc})")
        original = _own_or_inherited(owner, self.attribute)
        if original is _MISSING and not self.create:
            return self._skip(f"{owner!r} has no attribute {self.attribute!r}")
        problem = all_guards(self.guard)(original) if original is not _MISSING else None
        if problem:
            return self._skip(problem)
        self.problem = None
        for package in self.tested:
            note = untested_note(package)
            if note:
                info_once(
                    f"fastft: {note}; patches whose contract holds are applied (untested release)", key=f"untested:{package}"
                )
        self._owner_obj = owner
        self._original = original
        self._had_own = _has_own(owner, self.attribute)
        self._installed = self.replacement(original) if self.wrap else self.replacement
        setattr(owner, self.attribute, self._installed)
        _APPLIED.append(self)
        _SKIPPED.pop(self.name, None)
        logger.debug("fastft: applied %s", self.name)
        return True

    def _skip(self, problem: str) -> bool:
        self.problem = problem
        _SKIPPED[self.name] = problem
        warn_once(
            f"fastft: not applying '{self.name}' ({problem}); that piece stays unpatched and runs as upstream wrote it",
            key=f"skip:{self.name}",
        )
        return False

    def revert(self) -> None:
        """Restore the original; a no-op if not applied."""
        if not self.applied:
            return
        owner = self._owner_obj
        current = _own_or_inherited(owner, self.attribute)
        if current is not self._installed and not _same_bound_method(current, self._installed):
            # Someone replaced our replacement after us (another library, a test's monkeypatch): restoring our
            # original now would clobber theirs, so leave it and forget ours.
            logger.info("fastft: %s was replaced by someone else since; left as it is", self.name)
        elif self._had_own:
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


def _same_bound_method(a: Any, b: Any) -> bool:
    # instance attributes read back through the class MRO walk are the objects we set; bound methods compare equal
    return inspect.ismethod(a) and inspect.ismethod(b) and a.__func__ is b.__func__ and a.__self__ is b.__self__


def _has_own(owner: Any, attribute: str) -> bool:
    if inspect.isclass(owner) or inspect.ismodule(owner):
        return attribute in vars(owner)
    # nn.Module keeps submodules/parameters/buffers in its own dicts, not in __dict__
    return attribute in getattr(owner, "__dict__", {}) or any(
        attribute in getattr(owner, store, {}) for store in ("_modules", "_parameters", "_buffers")
    )


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


def skipped_patches() -> dict[str, str]:
    """``{patch name: reason}`` for every patch whose last apply() left its target unpatched."""
    return dict(_SKIPPED)


def revert_all() -> int:
    """Revert every applied patch, newest first; returns how many were reverted."""
    count = 0
    while _APPLIED:
        _APPLIED[-1].revert()
        count += 1
    return count
