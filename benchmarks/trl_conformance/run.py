"""Run TRL's own trainer tests twice -- unpatched, and with ``PatchFastRL(<row>)`` before each test -- and compare.

TRL's tests are not ours to copy into this repository: this script fetches them into a temporary directory, runs each
trainer's test file with the offline stand-ins of ``conformance_plugin.py`` next to this script (hub models and
datasets replaced by tiny local ones of the same architecture / configs and columns), and prints per trainer how many tests
passed and failed both ways, and every test that passes unpatched but fails patched (the conformance failures).

Where the tests come from (``--source``; the PyPI sdist of trl has no tests/):

* default: ``https://github.com/huggingface/trl/archive/refs/tags/v<installed trl>.tar.gz``;
* a URL of any tarball with a top-level ``*/tests`` directory;
* a directory holding ``tests/`` (a checkout);
* a git directory, optionally ``GITDIR@REV`` (``git archive REV tests``; REV defaults to HEAD).

Usage::

    python benchmarks/trl_conformance/run.py --trainers SFT,DPO,GRPO,KTO,RLOO [--source ...] [-k EXPR]
        [--out benchmarks/results/trl_conformance.json]

Runs are long (TRL's SFT file alone has ~100 tests, each trained twice): use ``nice`` and ``-k`` for subsets.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: PatchFastRL row -> TRL's test file for it
TEST_FILES = {
    "SFT": "tests/test_sft_trainer.py",
    "DPO": "tests/test_dpo_trainer.py",
    "GRPO": "tests/test_grpo_trainer.py",
    "KTO": "tests/test_kto_trainer.py",
    "RLOO": "tests/test_rloo_trainer.py",
    "Reward": "tests/test_reward_trainer.py",
    "ORPO": "tests/experimental/test_orpo_trainer.py",
    "CPO": "tests/experimental/test_cpo_trainer.py",
    "OnlineDPO": "tests/experimental/test_online_dpo_trainer.py",
}


def fetch_tests(source: str | None, workdir: Path) -> str:
    """Put TRL's ``tests/`` under ``workdir``; returns a description of where they came from."""
    import trl

    if source is None:
        source = f"https://github.com/huggingface/trl/archive/refs/tags/v{trl.__version__}.tar.gz"
    git_dir, _, rev = source.partition("@")
    if os.path.isdir(source) and os.path.isdir(os.path.join(source, "tests")):
        shutil.copytree(os.path.join(source, "tests"), workdir / "tests")
        return f"directory {source}"
    if os.path.isdir(git_dir):
        rev = rev or "HEAD"
        commit = subprocess.run(
            ["git", "--git-dir", git_dir, "rev-parse", rev], capture_output=True, text=True, check=True
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "--git-dir", git_dir, "archive", commit, "tests"], capture_output=True, check=True
        ).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(workdir, filter="data")
        version = subprocess.run(
            ["git", "--git-dir", git_dir, "show", f"{commit}:VERSION"], capture_output=True, text=True
        ).stdout.strip()
        return f"git {git_dir} at {commit} (VERSION {version or 'unknown'})"
    with urllib.request.urlopen(source, timeout=60) as response:
        data = response.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"]]
        for member in members:
            member.name = member.name.split("/", 1)[1]
        tar.extractall(workdir, members=members, filter="data")
    return f"tarball {source}"


def run_file(workdir: Path, test_file: str, row: str | None, keyword: str | None, timeout: int, log: Path) -> dict[str, str]:
    """``{test id: passed|failed|skipped}`` of one pytest run of ``test_file`` (patched with ``row`` when given)."""
    junit = log.with_suffix(".xml")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        FASTFT_CONFORMANCE_CACHE=str(workdir / ".stand_ins"),
        FASTFT_CONFORMANCE_TEST_TIMEOUT=str(timeout),
        TRL_EXPERIMENTAL_SILENCE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("FASTFT_CONFORMANCE_PATCH", None)
    env.pop("TRITON_INTERPRET", None)  # fastft's CPU path is its torch code, as a user on CPU gets
    if row:
        env["FASTFT_CONFORMANCE_PATCH"] = row
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        test_file,
        "-p",
        "conformance_plugin",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rN",
        "-o",
        "addopts=",
        "--junitxml",
        str(junit),
        "-W",
        "ignore",
    ]
    if keyword:
        cmd += ["-k", keyword]
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    results = {}
    if not junit.exists():
        return results
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        tags = {child.tag for child in case}
        results[name] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    return results


def _collection_error(log: Path) -> str | None:
    """The first ``E   ...`` line of a pytest log whose collection failed, else None."""
    text = log.read_text(errors="replace") if log.exists() else ""
    if "error during collection" not in text and "errors during collection" not in text:
        return None
    return next((line[1:].strip() for line in text.splitlines() if line.startswith("E ")), "see the log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", default="SFT,DPO,GRPO,KTO,RLOO", help="comma-separated PatchFastRL rows")
    parser.add_argument("--source", default=None, help="where TRL's tests come from (see the module docstring)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (a subset)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per test before it counts as failed")
    parser.add_argument("--workdir", default=None, help="keep the fetched tests and logs here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the per-test results as JSON here")
    args = parser.parse_args()
    rows = [row.strip() for row in args.trainers.split(",") if row.strip()]
    unknown = [row for row in rows if row not in TEST_FILES]
    if unknown:
        parser.error(f"unknown trainers {unknown}; known: {', '.join(TEST_FILES)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trl_conformance_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "tests").exists():
        where = fetch_tests(args.source, workdir)
    else:
        where = f"already in {workdir}"
    import trl

    print(f"TRL tests: {where}; installed trl {trl.__version__}; workdir {workdir}", flush=True)
    report = {"source": where, "trl": trl.__version__, "keyword": args.keyword, "trainers": {}}
    status = 0
    for row in rows:
        test_file = TEST_FILES[row]
        if not (workdir / test_file).exists():
            print(f"{row}: {test_file} is not in these tests; skipped", flush=True)
            continue
        start = time.time()
        plain = run_file(workdir, test_file, None, args.keyword, args.timeout, workdir / f"{row}-unpatched.log")
        fast = run_file(workdir, test_file, row, args.keyword, args.timeout, workdir / f"{row}-patched.log")
        regressions = sorted(t for t, r in plain.items() if r == "passed" and fast.get(t) != "passed")
        gains = sorted(t for t, r in fast.items() if r == "passed" and plain.get(t) != "passed")

        def count(results: dict[str, str]) -> dict[str, int]:
            return {k: sum(v == k for v in results.values()) for k in ("passed", "failed", "skipped")}

        report["trainers"][row] = {
            "file": test_file,
            "unpatched": count(plain),
            "patched": count(fast),
            "passes_unpatched_fails_patched": regressions,
            "fails_unpatched_passes_patched": gains,
            "seconds": round(time.time() - start),
        }
        print(
            f"{row}: unpatched {count(plain)} | patched {count(fast)} | {len(regressions)} pass unpatched but "
            f"fail patched ({time.time() - start:.0f} s)",
            flush=True,
        )
        collection = _collection_error(workdir / f"{row}-unpatched.log")
        if collection:  # these tests do not match the installed TRL: no test ran either way
            report["trainers"][row]["collection_error"] = collection
            print(f"    {test_file} did not collect: {collection}", flush=True)
        for test in regressions:
            print(f"    REGRESSION {test}", flush=True)
        for test in gains:
            print(f"    fails unpatched, passes patched: {test}", flush=True)
        status |= bool(regressions)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
