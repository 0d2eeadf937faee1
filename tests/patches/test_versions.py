"""The tested ranges are what CI tests: pyproject's ranges (read by fastft.versions) start at the oldest leg's pins and
hold every leg's pins; the next minor after the newest pin is outside."""

from __future__ import annotations

import os

from packaging.version import Version

from fastft.versions import TRACKED, declared_ranges, untested_note

PINS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".ci", "pins")


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    with open(os.path.join(PINS, f"{name}.txt"), encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                package, version = line.split("==")
                pins[package.lower()] = Version(version)
    return pins


def test_every_leg_pins_every_tracked_package_inside_its_range():
    ranges = declared_ranges()
    assert set(ranges) == set(TRACKED)
    for leg in ("default", "oldest", "newest-torch"):
        pins = {p: v for p, v in _pins(leg).items() if p in TRACKED}
        assert set(pins) == set(TRACKED), leg
        for package, version in pins.items():
            assert version in ranges[package], f"{leg}: {package} {version} outside {ranges[package]}"


def test_every_other_pin_is_a_declared_requirement_inside_its_ranges():
    """Pins of untracked packages (gguf, llama-cpp-python, ...) are requirements of pyproject (base or an extra),
    each inside every range declared for it, on every leg."""
    import tomllib
    from packaging.requirements import Requirement

    with open(os.path.join(os.path.dirname(os.path.dirname(PINS)), "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    declared: dict[str, list] = {}
    for text in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]:
        req = Requirement(text)
        declared.setdefault(req.name.lower(), []).append(req.specifier)
    for leg in ("default", "oldest", "newest-torch"):
        for package, version in _pins(leg).items():
            if package in TRACKED:
                continue
            assert package in declared, f"{leg}: {package} is pinned but no requirement of pyproject.toml"
            assert all(version in spec for spec in declared[package]), f"{leg}: {package} {version} outside"


def test_lower_bounds_are_the_oldest_leg_and_upper_bounds_the_next_minor_after_the_newest():
    ranges, oldest = declared_ranges(), _pins("oldest")
    newest = {p: max(_pins("default")[p], _pins("newest-torch")[p]) for p in TRACKED}
    for package, spec in ranges.items():
        lower = min(Version(s.version) for s in spec if s.operator == ">=")
        upper = min(Version(s.version) for s in spec if s.operator == "<")
        assert lower == oldest[package], f"{package}: range starts at {lower}, the oldest leg pins {oldest[package]}"
        major, minor = newest[package].release[:2]
        assert upper == Version(f"{major}.{minor + 1}"), f"{package}: {spec} vs newest tested {newest[package]}"


def test_untested_note_says_when_an_installed_release_is_outside(monkeypatch):
    import fastft.versions as versions

    monkeypatch.setattr(versions, "installed_version", lambda package: Version("99.0"))
    assert "outside the tested range" in untested_note("transformers")
    monkeypatch.setattr(versions, "installed_version", lambda package: Version("5.24.0"))
    assert untested_note("transformers") is None
