"""The ``teleport`` command: run experiments and benchmarks, list plugins.

Bad input (a config that cannot be read, an unknown key or plugin name, a
bad ``--set``, missing data) ends with a one-line ``teleport: error: ...``
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError
from .config import DEFAULT_CONFIG_NAME, ConfigError, apply_overrides, load_config
from .data import MissingDataError
from .distributed import is_main_process
from .registry import Registry, UnknownPluginError, default_registry

BENCH_PREFIX = "bench."
USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``teleport`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        _error(f"{_where(error, args)}{error}")
    except (UnknownPluginError, MissingDataError, CheckpointError) as error:
        _error(str(error))
    return USAGE_ERROR


def _error(message: str) -> None:
    """One line on stderr, even when the message quotes a multi-line error from a library."""
    print("teleport: error: " + " ".join(message.split()), file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teleport", description="Teleport neural networks along the loss level set."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run an experiment config (the embedded default without one)"
    )
    run.add_argument(
        "config", nargs="?", type=Path, help="a TOML config; its `kind` picks the experiment"
    )
    _add_run_options(run)
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its newest checkpoint (its config and folder are reused)",
    )
    run.set_defaults(handler=_run)

    bench = commands.add_parser("bench", help="run a registered benchmark")
    bench.add_argument("name", help="the benchmark (a registered experiment kind `bench.NAME`)")
    _add_run_options(bench)
    bench.set_defaults(handler=_bench)

    plugins = commands.add_parser(
        "plugins", help="list every registered plugin and where it came from"
    )
    plugins.set_defaults(handler=_plugins)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value; KEY is dotted (training.epochs), VALUE a TOML literal or a string",
    )
    parser.add_argument(
        "--out", type=Path, help="the run folder (default: runs/<kind>-<date>-<time>)"
    )


def _run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        if args.config is not None or args.out is not None:
            raise ConfigError("--resume RUN_DIR reuses that run's config and folder: give no CONFIG or --out")
        if not (args.resume / "config.toml").is_file():
            raise ConfigError(f"{args.resume} is not a run folder: it has no config.toml")
        args.config, args.out = args.resume / "config.toml", args.resume
        args.overrides = [*args.overrides, "checkpoint.resume=true"]
    config = apply_overrides(load_config(args.config), args.overrides)
    kind = config.get("kind", "train")
    if not isinstance(kind, str):
        raise ConfigError(
            f"kind must be a string naming an experiment kind, got {kind!r}", key="kind"
        )
    return _execute(default_registry().get("experiment", kind), config, kind, args.out)


def _bench(args: argparse.Namespace) -> int:
    registry = default_registry()
    kind = BENCH_PREFIX + args.name
    if kind not in registry.names("experiment"):
        known = ", ".join(_bench_names(registry)) or "none are registered"
        raise UnknownPluginError(f"unknown benchmark {args.name!r}; registered benchmarks: {known}")
    config = apply_overrides({"kind": kind}, args.overrides)
    return _execute(registry.get("experiment", kind), config, kind, args.out)


def _execute(runner: Any, config: dict[str, Any], kind: str, out: Path | None) -> int:
    out_dir = (
        out
        if out is not None
        else Path("runs") / f"{kind.replace('.', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    runner(config, out_dir)
    if is_main_process():  # under torchrun, rank 0 speaks for all
        print(f"outputs in {out_dir}")
    return 0


def _bench_names(registry: Registry) -> list[str]:
    return [
        name.removeprefix(BENCH_PREFIX)
        for name in registry.names("experiment")
        if name.startswith(BENCH_PREFIX)
    ]


def _plugins(args: argparse.Namespace) -> int:
    rows = [("kind", "name", "object", "from")]
    for entry in default_registry().entries():
        target = getattr(entry.target, "__qualname__", None) or type(entry.target).__qualname__
        module = getattr(entry.target, "__module__", None) or type(entry.target).__module__
        rows.append((entry.kind, entry.name, f"{module}.{target}", entry.origin))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[3]
        )
    return 0


def _where(error: ConfigError, args: argparse.Namespace) -> str:
    """Where a config problem comes from: a ``--set`` override or the config file."""
    if error.key is not None:
        for override in getattr(args, "overrides", []):
            key = override.partition("=")[0].strip()
            if (
                error.key == key
                or error.key.startswith((key + ".", key + "["))
                or key.startswith(error.key + ".")
            ):
                return f"--set {override}: "
    if getattr(args, "config", None) is not None and error.key is not None:
        return f"{args.config}: "
    if getattr(args, "command", None) == "run" and error.key is not None:
        return f"{DEFAULT_CONFIG_NAME}: "
    return ""
