"""The tested ranges are what CI tests: pyproject's ranges (read by fastft.versions) start at the oldest leg's pins and
hold every leg's pins; the next minor after the newest pin is outside."""

from __future__ import annotations

import os

from packaging.version import Version

from fastft.versions import TRACKED, declared_ranges, untested_note

PINS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".ci", "pins")
#: Pinned on every leg but not a patched library (GGUF export: the ``gguf`` dev/extra, llama-cpp-python's extra).
EXPORT_PINS = ("gguf", "llama-cpp-python")


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
        pins = {p: v for p, v in _pins(leg).items() if p not in EXPORT_PINS}
        assert set(pins) == set(TRACKED), leg
        for package, version in pins.items():
            assert version in ranges[package], f"{leg}: {package} {version} outside {ranges[package]}"


def test_export_pins_are_on_every_leg_inside_the_gguf_extra():
    import tomllib
    from packaging.requirements import Requirement

    with open(os.path.join(os.path.dirname(PINS), "..", "pyproject.toml"), "rb") as handle:
        requirements = tomllib.load(handle)["project"]["optional-dependencies"]["gguf"]
    extra = {r.name: r.specifier for r in map(Requirement, requirements)}
    assert set(extra) == set(EXPORT_PINS)
    for leg in ("default", "oldest", "newest-torch"):
        for package in EXPORT_PINS:
            assert _pins(leg)[package] in extra[package], (leg, package)


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
