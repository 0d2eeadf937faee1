"""The tested version ranges, read from the one place they are declared: fastft's own package metadata (pyproject).

CI installs the oldest and the newest release of every range and runs the patch, model and TRL tests on both, so a
range here is a statement of what was tested. A release outside it is not refused: each patch checks the contract it
relies on (:mod:`fastft.patches.base`), applies when it holds and says once that the version is untested.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: The packages whose ranges are reported by ``fastft doctor`` (in this order).
TRACKED = ("torch", "triton", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


@functools.lru_cache(maxsize=1)
def declared_ranges() -> dict[str, SpecifierSet]:
    """``{package: specifier}`` from fastft's requirements (base dependencies and the ``quant`` extra).

    A source checkout's own pyproject.toml wins over installed metadata, which can be older than the checkout (a
    cached venv that once installed fastft, a checkout on PYTHONPATH)."""
    requirements = _requirements_from_pyproject() if os.path.isfile(_PYPROJECT) else None
    if requirements is None:
        try:
            requirements = importlib.metadata.requires("fastft") or []
        except importlib.metadata.PackageNotFoundError:
            requirements = []
    ranges: dict[str, SpecifierSet] = {}
    for text in requirements:
        req = Requirement(text)
        extra_only = req.marker is not None and "extra" in str(req.marker)
        if extra_only and 'extra == "quant"' not in str(req.marker):
            continue
        name = req.name.lower()
        if name in TRACKED and name not in ranges:
            ranges[name] = req.specifier
    return ranges


#: pyproject.toml beside the package: present in a source checkout (editable installs included), absent in a wheel.
_PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def _requirements_from_pyproject() -> list[str] | None:
    """The dependency strings of fastft's own pyproject.toml; None if the file there is not fastft's."""
    path = _PYPROJECT
    try:
        import tomllib
    except ImportError:  # Python 3.10: a plain scan of the dependency strings is enough for our own file
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not re.search(r'^name\s*=\s*"fastft"', text, flags=re.M):
            return None
        return re.findall(r'^\s*"([A-Za-z][^"]*)",?\s*$', text, flags=re.M)
    with open(path, "rb") as handle:
        project = tomllib.load(handle).get("project", {})
    if project.get("name") != "fastft":
        return None
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("quant", [])]


def installed_version(package: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def untested_note(package: str) -> str | None:
    """None when ``package`` is installed inside its tested range (or has none), else a sentence saying it is not."""
    spec = declared_ranges().get(package)
    have = installed_version(package)
    if spec is None or have is None:
        return None
    # A local build tag (2.13.0+cpu) is the same release for our purposes.
    if Version(have.public) in spec:
        return None
    return f"{package} {have} is outside the tested range {spec}"


def version_table() -> list[dict[str, str | bool | None]]:
    """One row per tracked package: installed version, tested range, whether it is inside."""
    rows = []
    for package in TRACKED:
        spec = declared_ranges().get(package)
        have = installed_version(package)
        rows.append(
            {
                "package": package,
                "installed": None if have is None else str(have),
                "tested": None if spec is None else str(spec),
                "in_range": None if have is None or spec is None else Version(have.public) in spec,
            }
        )
    return rows
