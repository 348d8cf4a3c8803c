"""``rlprox zoo list`` and ``rlprox zoo build NAME [--seed S] [--micro] [--force]``.

``add_zoo_parser(subparsers)`` adds the ``zoo`` command to the main argparse parser;
``run_zoo(args)`` executes it and returns the exit code.
"""

from __future__ import annotations

import argparse
import sys


def add_zoo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "zoo",
        help="offline digits-world base models (build, list)",
        description="Tiny offline base models trained from scikit-learn's digits.",
    )
    zoo_sub = parser.add_subparsers(dest="zoo_command", metavar="{list,build}")
    zoo_sub.add_parser("list", help="list the zoo models and their cache state")
    build = zoo_sub.add_parser("build", help="build (train) a zoo model into the cache")
    build.add_argument(
        "name",
        help="digits-classifier | digits-sd | digits-sd3 | digits-qwen | digits-wan | digits-vq | digits-gpt | all",
    )
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--micro", action="store_true", help="~5%% of the steps (smoke test)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.set_defaults(func=run_zoo)
    return parser


def run_zoo(args: argparse.Namespace) -> int:
    from rlprox.zoo.build import MODELS, build, build_order, cache_root, model_dir

    command = getattr(args, "zoo_command", None)
    if command in (None, "list"):
        print(f"zoo cache: {cache_root()}")
        for name, description in MODELS.describe().items():
            state = "built" if model_dir(name, 0).is_dir() else "not built"
            print(f"  {name:<18} {description} [seed 0: {state}]")
        return 0
    names = build_order() if args.name == "all" else [args.name]
    try:
        for name in names:
            path = build(name, seed=args.seed, micro=args.micro, force=args.force, threads=args.threads)
            print(path)
    except ValueError as err:
        print(f"zoo error: {err}", file=sys.stderr)
        return 2
    return 0
