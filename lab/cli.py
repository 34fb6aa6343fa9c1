"""The ``teleport`` command: run experiments and benchmarks, print configs, check models, list plugins.

Bad input (a config that cannot be read, an unknown key or plugin name, a
bad ``--set``, missing data) ends with a one-line ``teleport: error: ...``
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from torch_teleport.core_space import DEFAULT_NULL_SPACE, resolve_null_space
from torch_teleport.coverage_table import check_coverage
from torch_teleport.plugin_manager import DISTRIBUTION
from torch_teleport.registry import Registry, UnknownPluginError, default_registry

from .checkpoint import CheckpointError
from .config import DEFAULT_CONFIG_NAME, ConfigError, apply_overrides, dumps_toml, load_config
from .data import MissingDataError
from .launch import is_main_process

BENCH_PREFIX = "bench."
USAGE_ERROR = 2


def package_version() -> str:
    """The installed distribution's version; the package's own when it runs from a source tree."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        from torch_teleport import __version__

        return __version__


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
    parser.add_argument(
        "--version", action="version", version=f"{DISTRIBUTION} {package_version()}"
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

    config = commands.add_parser(
        "config",
        help="print the resolved config `teleport run` would use (the embedded default without one)",
    )
    config.add_argument("config", nargs="?", type=Path, help="a TOML config")
    _add_set_option(config)
    config.set_defaults(handler=_config)

    check = commands.add_parser(
        "check",
        help="show which modules of a registered model a teleport moves, on a random example batch",
    )
    check.add_argument(
        "model",
        nargs="?",
        help="a registered model (`teleport plugins`), e.g. mlp (default: the --config's [model])",
    )
    check.add_argument(
        "--config",
        type=Path,
        help="a run config: its [teleport] null_space and tau judge the room; its [model] is "
        "checked when MODEL is not given",
    )
    check.add_argument(
        "--null-space",
        metavar="NAME",
        help=f"the teleport's null space (default: the config's, else {DEFAULT_NULL_SPACE})",
    )
    check.add_argument(
        "--tau", type=float, help="its tau (default: the config's, else the null space's default)"
    )
    _add_set_option(
        check,
        "a keyword option of the model factory, e.g. hidden=[64]; VALUE a TOML literal or a string",
    )
    check.add_argument(
        "--batch", type=int, default=32, help="samples in the example batch (default: 32)"
    )
    check.add_argument(
        "--shape",
        type=_shape,
        help="the shape of one sample, e.g. 3,32,32 (needed for models without a built-in example)",
    )
    check.add_argument(
        "--tokens",
        type=int,
        metavar="VOCAB",
        help="the inputs are token ids below VOCAB (with --shape giving the sequence length)",
    )
    check.add_argument("--json", action="store_true", help="print the table as JSON")
    check.set_defaults(handler=_check)

    plugins = commands.add_parser(
        "plugins", help="list every registered plugin and where it came from"
    )
    plugins.set_defaults(handler=_plugins)
    return parser


def _add_set_option(
    parser: argparse.ArgumentParser,
    help: str = "override a config value; KEY is dotted (training.epochs), VALUE a TOML literal or a string",
) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_set_option(parser)
    parser.add_argument(
        "--out", type=Path, help="the run folder (default: runs/<kind>-<YYYYmmdd>-<HHMMSS>)"
    )


def _run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        if args.config is not None or args.out is not None:
            raise ConfigError("--resume RUN_DIR reuses that run's config and folder: give no CONFIG or --out")
        if not (args.resume / "config.toml").is_file():
            raise ConfigError(f"{args.resume} is not a run folder: it has no config.toml")
        args.config, args.out = args.resume / "config.toml", args.resume
        args.overrides = [*args.overrides, "checkpoint.resume=true"]
    config, kind, runner = _experiment(args)
    return _execute(runner, config, kind, args.out)


def _experiment(args: argparse.Namespace) -> tuple[dict[str, Any], str, Any]:
    """The config of ``args`` with its overrides, its kind and the kind's runner."""
    config = apply_overrides(load_config(args.config), args.overrides)
    kind = config.get("kind", "train")
    if not isinstance(kind, str):
        raise ConfigError(
            f"kind must be a string naming an experiment kind, got {kind!r}", key="kind"
        )
    return config, kind, default_registry().get("experiment", kind)


def _config(args: argparse.Namespace) -> int:
    """Print the config as the experiment will see it, defaults filled in, and run nothing.

    A runner resolves it when it has a ``resolve_config(config)`` attribute
    (the ``train`` kind does); otherwise the config is printed as given.
    """
    config, kind, runner = _experiment(args)
    resolver = getattr(runner, "resolve_config", None)
    if resolver is not None:
        config = resolver(config)
    else:
        print(f"# kind {kind!r} does not resolve its config: printed as given")
    print(dumps_toml(config, unset=True), end="")
    return 0


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


# -- teleport check -------------------------------------------------------------------
Example = Callable[[dict[str, Any]], tuple[tuple[int, ...], int | None]]

EXAMPLES: dict[str, Example] = {
    "mlp": lambda o: ((o["input_dim"],), None),
    "cnn": lambda o: ((o["in_channels"], *_pair(o["image_size"])), None),
    "resnet": lambda o: ((o["in_channels"], 64, 64), None),
    "transformer_classifier": lambda o: ((o["seq_len"], o["input_dim"]), None),
    "transformer_regressor": lambda o: ((o["window"], o["n_series"]), None),
    "transformer_lm": lambda o: ((o["seq_len"],), o["vocab_size"]),
    "mamba_classifier": lambda o: ((64, o["input_dim"]), None),
    "mamba_lm": lambda o: ((64,), o["vocab_size"]),
}
"""The shape of one sample of each built-in model, from its options, and its vocabulary for token ids."""


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,32,32, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return shape


def _check(args: argparse.Namespace) -> int:
    """Print the coverage table of a registered model on a random example batch."""
    registry = default_registry()
    config = load_config(args.config) if args.config else {}
    name, options = _model_to_check(args, config)
    factory = registry.get("model", name)
    if args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")
    core_space = _core_space(args, config, registry)
    torch.manual_seed(0)
    try:
        model = factory(**options)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"building model {name!r} failed: {_first_line(error)}") from error
    inputs, description = _example_batch(args, name, factory, options)
    try:
        table = check_coverage(model, inputs, registry=registry, **core_space)
    except (TypeError, ValueError, RuntimeError, IndexError) as error:
        raise ConfigError(
            f"running model {name!r} on {description} failed: {_first_line(error)} "
            "(--shape and --tokens set the example inputs)"
        ) from error
    if args.json:
        data = table.to_dict()
        data["type"] = data.pop("model")
        print(json.dumps({"model": name, "inputs": description, **data}, indent=2))
    else:
        print(f"{name} on {description}, null space {table.null_space}:\n")
        print(table)
    return 0


def _model_to_check(args: argparse.Namespace, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """MODEL with its ``--set`` options, else the config's ``[model]``, options updated by ``--set``."""
    if args.model is not None:
        return args.model, apply_overrides({}, args.overrides)
    model = config.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str)):
        where = f"{args.config} has no [model] name" if args.config else "no MODEL given"
        raise ConfigError(f"{where}: give the registered model to check, e.g. teleport check mlp")
    options = model.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{args.config}: model.options must be a table, got {options!r}")
    return model["name"], apply_overrides(options, args.overrides)


def _core_space(
    args: argparse.Namespace, config: dict[str, Any], registry: Registry
) -> dict[str, Any]:
    """The teleport's ``null_space`` and ``tau``: the flags, else the config's ``[teleport]``, else
    the teleport's defaults; checked before any model is built."""
    teleport = config.get("teleport", {})
    if not isinstance(teleport, dict):
        raise ConfigError(f"{args.config}: [teleport] must be a table, got {teleport!r}")
    null_space = args.null_space or teleport.get("null_space", DEFAULT_NULL_SPACE)
    tau = args.tau if args.tau is not None else teleport.get("tau")
    try:
        resolve_null_space(null_space, tau, registry)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"null space {null_space!r} with tau {tau}: {error}") from None
    return {"null_space": null_space, "tau": tau}


def _example_batch(
    args: argparse.Namespace, name: str, factory: Any, options: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """A random batch for the model: the built-in example for its name, or ``--shape``/``--tokens``."""
    shape, vocabulary = args.shape, args.tokens
    if name in EXAMPLES:
        defaults = {
            key: parameter.default
            for key, parameter in inspect.signature(factory).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        example_shape, example_vocabulary = EXAMPLES[name]({**defaults, **options})
        shape, vocabulary = shape or example_shape, vocabulary or example_vocabulary
    elif shape is None:
        raise ConfigError(
            f"no built-in example inputs for model {name!r}: give the shape of one "
            "sample with --shape (and --tokens VOCAB for token ids)"
        )
    generator = torch.Generator().manual_seed(0)
    size = (args.batch, *shape)
    if vocabulary:
        inputs = torch.randint(0, vocabulary, size, generator=generator)
        return inputs, f"random token ids below {vocabulary}, shape {size}"
    return torch.randn(size, generator=generator), f"random normal inputs of shape {size}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    if getattr(args, "command", None) in ("run", "config") and error.key is not None:
        return f"{DEFAULT_CONFIG_NAME}: "
    return ""
