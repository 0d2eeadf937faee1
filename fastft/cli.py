"""``fastft`` command line: ``demo`` (the offline main job), ``train CONFIG.yaml``, ``plan``, ``doctor``, ``smoke``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from fastft.demo import run_demo

    return run_demo(output_dir=args.output_dir, quick=args.quick)


def _smoke(args: argparse.Namespace) -> int:
    from fastft.smoke import run_smoke

    return run_smoke()


def _train(args: argparse.Namespace) -> int:
    import shlex

    from fastft.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
        from fastft.train.run import run  # heavy imports only after the config is known to be valid

        result = run(cfg, max_minutes=args.max_minutes, resume=True if args.resume else None)
    except ConfigError as exc:
        print(f"fastft: {exc}", file=sys.stderr)
        return 2
    if result.stopped_reason:
        again = ["fastft", "train", args.config, *(f"--set={s}" for s in args.set), "--resume"]
        print(
            f"fastft: stopped early ({result.stopped_reason}) at step {result.global_step}; full checkpoint saved "
            f"to {result.checkpoint}.\nfastft: resume with: {shlex.join(again)}"
        )
    else:
        print(f"fastft: training finished at step {result.global_step}; model saved to {result.output_dir}")
    print(f"fastft: report: {result.report_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastft", description="Faster, leaner fine-tuning for Hugging Face TRL.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline CPU demo: SFT-warm a tiny model on arithmetic, then GRPO")
    demo.add_argument("--output-dir", default=None, help="where to write the reports (default: a new temp dir)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (under a minute; used by the tests)")
    demo.set_defaults(func=_demo)
    smoke = sub.add_parser("smoke", help="kernel smoke run: RMSNorm, RoPE, SwiGLU, GeGLU vs their references, both paths")
    smoke.set_defaults(func=_smoke)
    train = sub.add_parser("train", help="train from a YAML config (see examples/)")
    train.add_argument("config", help="the YAML config file")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set trainer.learning_rate=1e-4 (repeatable)",
    )
    train.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time budget: save a full checkpoint and exit cleanly before exceeding it",
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.set_defaults(func=_train)
    from fastft.doctor import add_parser as _add_doctor_parser
    from fastft.memory.plan import add_parser as _add_plan_parser

    _add_plan_parser(sub)
    _add_doctor_parser(sub)
    from fastft.export.adapter import add_parser as _add_export_parser

    _add_export_parser(sub)
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    return args.func(args)
