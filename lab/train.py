"""The ``train`` experiment: each optimizer with and without teleport, over seeds, compared.

Every (optimizer, with/without teleport, seed) run trains the same model
from the same initialisation on the same batch order; teleport runs use
:class:`~torch_teleport.TeleportTrainer` with random teleport batches drawn
from a shuffled loader. Per epoch it records the train and test loss over
the whole split and the training wall-clock (teleports included,
evaluation excluded); per teleport the :class:`TeleportReport` numbers.
The config schema is documented in ``docs/cli.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torch_teleport import (
    Limits,
    Schedule,
    Teleporter,
    TeleportReport,
    TeleportTrainer,
    default_schedule,
    hookimpl,
)
from torch_teleport.distributed import Replicas
from torch_teleport.lab.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from torch_teleport.lab.config import (
    OPTIONS,
    REQUIRED,
    ConfigError,
    Option,
    Table,
    TableList,
    at_least,
    dumps_toml,
    interval,
    non_empty,
    one_of,
    positive,
    resolve,
)
from torch_teleport.lab.data import DataSplits
from torch_teleport.lab.experiment import (
    OPTIMIZERS,
    Loaders,
    build_optimizer,
    evaluate_loss,
    first_reaching,
    format_mean_std,
    make_loaders,
    markdown_table,
    mean_std,
    plot_curves,
    progress_bar,
    seed_everything,
    summary_writer,
    write_json,
)
from torch_teleport.lab.launch import (
    Silent,
    all_gather_objects,
    barrier,
    is_main_process,
    join_launch,
    leave_launch,
    rank_and_world,
)
from torch_teleport.optimizer_state import POLICIES as STATE_POLICIES
from torch_teleport.plugins.methods.null_space import NullSpaceMethod
from torch_teleport.registry import Registry, default_registry

TELEPORTER_DEFAULTS = {
    name: parameter.default
    for signature in (inspect.signature(Teleporter), inspect.signature(NullSpaceMethod), inspect.signature(Limits))
    for name, parameter in signature.parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
"""The ``[teleport]`` table defaults to whatever :class:`Teleporter`, its default method and its
:class:`Limits` default to..."""

TRAINER_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(TeleportTrainer).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
"""...and to :class:`TeleportTrainer`'s defaults where it sets the trainer."""

OPTIMIZER = Table(
    {
        "name": Option(REQUIRED, str, check=one_of(*sorted(OPTIMIZERS))),
        "lr": Option(REQUIRED, float, check=positive),
        "label": Option(None, str),
        "options": OPTIONS,
    }
)

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
"""Training losses by config name: classification (and next-token) cross-entropy, regression MSE."""

SCHEMA = Table(
    {
        "kind": Option("train", str, check=one_of("train")),
        "device": Option("cpu", str),
        "threads": Option(None, int, check=at_least(1)),
        "model": Table({"name": Option(REQUIRED, str, plugin="model"), "options": OPTIONS}),
        "dataset": Table(
            {
                "name": Option(REQUIRED, str, plugin="dataset"),
                "root": Option("data", str),
                "options": OPTIONS,
            }
        ),
        "training": Table(
            {
                "loss": Option("cross_entropy", str, check=one_of(*LOSSES)),
                "epochs": Option(REQUIRED, int, check=at_least(1)),
                "batch_size": Option(32, int, check=at_least(1)),
                "eval_batch_size": Option(1024, int, check=at_least(1)),
                "seeds": Option([0, 1, 2], list, items=int, check=non_empty),
                "with_teleport": Option([False, True], list, items=bool, check=non_empty),
                "target_loss": Option(None, float),
                "optimizers": TableList(OPTIMIZER, check=non_empty),
            }
        ),
        "teleport": Table(
            {
                "method": Option(TELEPORTER_DEFAULTS["method"], str, plugin="method"),
                "objective": Option(TELEPORTER_DEFAULTS["objective"], str, plugin="objective"),
                "null_space": Option(TELEPORTER_DEFAULTS["null_space"], str, plugin="null_space"),
                "tau": Option(
                    TELEPORTER_DEFAULTS["tau"], float, check=interval(0, 1, open_low=True)
                ),
                "lr": Option(TELEPORTER_DEFAULTS["lr"], float, check=positive),
                "steps": Option(TELEPORTER_DEFAULTS["steps"], int, check=at_least(1)),
                "cap": Option(TELEPORTER_DEFAULTS["cap"], float, check=positive),
                "normalize": Option(TELEPORTER_DEFAULTS["normalize"], bool),
                "batch_size": Option(32, int, check=at_least(1)),
                "guard_samples": Option(TRAINER_DEFAULTS["guard_samples"], int, check=at_least(1)),
                "uncovered": Option(TELEPORTER_DEFAULTS["uncovered"], str, check=one_of("error", "warn", "freeze")),
                "optimizer_state": Option("auto", str, check=one_of(*STATE_POLICIES)),
                "max_loss_change": Option(
                    TELEPORTER_DEFAULTS["max_loss_change"], float, check=at_least(0)
                ),
                "on_failure": Option("skip", str, check=one_of("skip", "raise")),
                "objective_options": OPTIONS,
                "method_options": OPTIONS,
                "schedule": Table(
                    {"name": Option("auto", str, plugin="schedule"), "options": OPTIONS}
                ),
            }
        ),
        "checkpoint": Table(
            {
                "every": Option(1, int, check=at_least(0)),
                "keep": Option(2, int, check=at_least(1)),
                "resume": Option(False, bool),
            }
        ),
        "distributed": Table({"verify": Option(False, bool)}),
    }
)


@dataclass
class TrainSetup:
    """A checked config with everything it names looked up: nothing left that can fail on input."""

    config: dict[str, Any]
    registry: Registry
    device: torch.device
    splits: DataSplits = field(init=False)

    @property
    def training(self) -> dict[str, Any]:
        return self.config["training"]

    @property
    def loss_fn(self):
        return LOSSES[self.training["loss"]]

    def build_model(self) -> nn.Module:
        model = self.config["model"]
        return self.registry.get("model", model["name"])(**model["options"]).to(self.device)

    def build_schedule(self, optimizer: torch.optim.Optimizer | None = None) -> Schedule:
        """The named schedule, or for ``"auto"`` the library's default for ``optimizer``."""
        teleport = self.config["teleport"]
        schedule = teleport["schedule"]
        if schedule["name"] == "auto":
            if schedule["options"]:
                raise ConfigError(
                    "teleport.schedule.options: the 'auto' schedule takes none; name a schedule to set them",
                    key="teleport.schedule.options",
                )
            return default_schedule(optimizer, steps=teleport["steps"], cap=teleport["cap"])
        options = {"steps": teleport["steps"], "cap": teleport["cap"], **schedule["options"]}
        return self.registry.get("schedule", schedule["name"])(**options)

    def build_teleporter(self, model: nn.Module) -> Teleporter:
        teleport = self.config["teleport"]
        null_space_options = (  # options of the null-space method; baselines take their own
            {key: teleport[key] for key in ("null_space", "tau", "uncovered")}
            if teleport["method"] == "null_space"
            else {}
        )
        objective = self.registry.get("objective", teleport["objective"])(**teleport["objective_options"])
        return Teleporter(
            model,
            self.loss_fn,
            method=teleport["method"],
            objective=objective,
            lr=teleport["lr"],
            steps=teleport["steps"],
            cap=teleport["cap"],
            normalize=teleport["normalize"],
            limits=Limits(max_loss_change=teleport["max_loss_change"]),
            replicas=Replicas(verify=self.config["distributed"]["verify"]),
            registry=self.registry,
            **null_space_options,
            **teleport["method_options"],
        )

    def runs(self) -> Iterator[RunSpec]:
        for optimizer in self.training["optimizers"]:
            for teleport in self.training["with_teleport"]:
                for seed in self.training["seeds"]:
                    yield RunSpec(optimizer, teleport, seed)


@dataclass(frozen=True)
class RunSpec:
    """One run: an optimizer entry of the config, with or without teleport, and a seed."""

    optimizer: dict[str, Any]
    teleport: bool
    seed: int

    @property
    def name(self) -> str:
        return (
            f"{self.optimizer['label']}-{'teleport' if self.teleport else 'plain'}-seed{self.seed}"
        )


@dataclass
class RunHistory:
    """What one run measured; index ``e`` of the per-epoch lists is after ``e`` epochs (0 = at init).

    ``seconds`` is cumulative training wall-clock, ``cpu_seconds`` the
    process CPU time of the same spans (less sensitive to other load on
    the machine); both include teleports and exclude evaluation.
    """

    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    teleport_seconds: float = 0.0
    teleports: list[dict[str, Any]] = field(default_factory=list)


# -- checking -----------------------------------------------------------------------
def prepare(config: dict[str, Any], registry: Registry | None = None) -> TrainSetup:
    """Check ``config`` completely, load the data and try every plugin once, before any training.

    Raises :class:`ConfigError` (bad keys, values or plugin options),
    :class:`~torch_teleport.UnknownPluginError` (a name nothing provides) or
    :class:`~torch_teleport.lab.data.MissingDataError`.
    """
    registry = registry or default_registry()
    config = resolve_config(config, registry)
    with _rejected("device", f"using device {config['device']!r}"):
        device = torch.device(config["device"])
        torch.empty(0, device=device)
    dataset = config["dataset"]
    factory = registry.get("dataset", dataset["name"])
    setup = TrainSetup(config, registry, device)
    with _rejected("model.options", f"building model {config['model']['name']!r}"):
        probe = setup.build_model()
    for i, optimizer in enumerate(config["training"]["optimizers"]):
        with _rejected(f"training.optimizers[{i}]", f"building optimizer {optimizer['name']!r}"):
            build_optimizer(
                optimizer["name"], probe.parameters(), optimizer["lr"], optimizer["options"]
            )
    if any(config["training"]["with_teleport"]):
        for name in ("steps", "cap"):
            if name in config["teleport"]["schedule"]["options"]:
                key = f"teleport.schedule.options.{name}"
                raise ConfigError(
                    f"{key}: set teleport.{name} instead (the schedule gets it)", key=key
                )
        schedule = config["teleport"]["schedule"]["name"]
        with _rejected("teleport.schedule", f"building schedule {schedule!r}"):
            setup.build_schedule()
        with _rejected("teleport", "building the teleporter"):
            setup.build_teleporter(probe)
    with _rejected("dataset.options", f"loading dataset {dataset['name']!r}"):
        setup.splits = factory(dataset["root"], **dataset["options"])
    _check_fit(probe, setup.splits, device, config)
    return setup


def resolve_config(config: dict[str, Any], registry: Registry | None = None) -> dict[str, Any]:
    """``config`` checked against :data:`SCHEMA`, defaults and optimizer labels filled in; nothing is built.

    Plugin names are checked against ``registry`` (default: the default registry). What a run
    writes to its ``config.toml``, and what ``teleport config`` prints.
    """
    config = resolve(config, SCHEMA, registry or default_registry())
    _label_optimizers(config["training"]["optimizers"])
    return config


@contextlib.contextmanager
def _rejected(key: str, what: str) -> Iterator[None]:
    """Turn a plugin's complaint about its options into a :class:`ConfigError` naming ``key``."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{key}: {what} failed: {reason}", key=key) from error


def _label_optimizers(optimizers: list[dict[str, Any]]) -> None:
    labels = [optimizer["label"] or optimizer["name"] for optimizer in optimizers]
    for optimizer, label in zip(optimizers, labels, strict=True):
        optimizer["label"] = label
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(
            f"training.optimizers: {duplicates[0]!r} appears twice; give the entries distinct labels",
            key="training.optimizers",
        )


def _check_fit(model: nn.Module, splits: DataSplits, device: torch.device, config: dict) -> None:
    """One sample through the model: its inputs must fit and its outputs must suit the loss.

    Cross-entropy wants one logit per class for each target entry (``(classes,)``
    for a label, ``(classes, time)`` for a token sequence); MSE wants the target's shape.
    """
    inputs, target = splits.train[0]
    running = f"running model {config['model']['name']!r} on dataset {config['dataset']['name']!r}"
    with _rejected("model.options", running):
        with torch.no_grad():
            outputs = model(inputs.unsqueeze(0).to(device))
    target_shape = tuple(torch.as_tensor(target).shape)
    if config["training"]["loss"] == "cross_entropy":
        expected, wanted = (splits.num_classes, *target_shape), f"{splits.num_classes} classes"
    else:
        expected, wanted = target_shape, f"targets of shape {target_shape}"
    if tuple(outputs.shape) != (1, *expected):
        raise ConfigError(
            f"model.options: model {config['model']['name']!r} gives outputs of shape "
            f"{tuple(outputs.shape[1:])} per sample, dataset {config['dataset']['name']!r} has "
            f"{wanted}",
            key="model.options",
        )


# -- running ----------------------------------------------------------------------
class Run:
    """One (optimizer, teleport, seed) run: its model, optimizer, trainer, loaders, log and history.

    Everything a checkpoint would need is an attribute: the model, the
    optimizer, the trainer (its ``state_dict`` holds epoch, step and
    schedule state) and the history.
    """

    def __init__(
        self, setup: TrainSetup, spec: RunSpec, log_dir: Path, state: dict[str, Any] | None = None
    ) -> None:
        training, teleport = setup.training, setup.config["teleport"]
        rank, world = rank_and_world()
        self.spec = spec
        self.device = setup.device
        self.loss_fn = setup.loss_fn
        seed_everything(spec.seed)
        self.model = setup.build_model()
        self.optimizer = build_optimizer(
            spec.optimizer["name"],
            self.model.parameters(),
            spec.optimizer["lr"],
            spec.optimizer["options"],
        )
        self.loaders: Loaders = make_loaders(
            setup.splits,
            batch_size=training["batch_size"],
            teleport_batch_size=teleport["batch_size"],
            eval_batch_size=training["eval_batch_size"],
            seed=spec.seed,
            rank=rank,
            world=world,
        )
        # Under torchrun the optimizer steps through DistributedDataParallel; teleports see the
        # replicas through Replicas (the Teleporter unwraps the model).
        trained = nn.parallel.DistributedDataParallel(self.model) if world > 1 else self.model
        self.trainer = TeleportTrainer(
            trained,
            self.loss_fn,
            self.optimizer,
            teleporter=setup.build_teleporter(self.model) if spec.teleport else None,
            schedule=setup.build_schedule(self.optimizer) if spec.teleport else None,
            teleport_data=self.loaders.teleport if spec.teleport else None,
            optimizer_state=teleport["optimizer_state"],
            device=setup.device,
            on_teleport_failure=teleport["on_failure"],
            guard_samples=teleport["guard_samples"],
        )
        self.history = RunHistory()
        if state is not None:
            self.load_state_dict(state)
        resume_step = self.trainer.global_step if state is not None else None
        self.writer = (
            summary_writer(log_dir / spec.name, resume_step) if is_main_process() else Silent()
        )
        if state is None:
            self._record(seconds=0.0, cpu_seconds=0.0)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly: weights, optimizer, trainer, data order, RNG."""
        return {
            "spec": self.spec.name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": self.trainer.state_dict(),
            "train_order": self.loaders.train.generator.get_state(),
            "history": asdict(self.history),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["spec"] != self.spec.name:
            raise CheckpointError(
                f"the checkpoint continues run {state['spec']!r} but the config's next run is "
                f"{self.spec.name!r}: the config changed since the checkpoint"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.trainer.load_state_dict(state["trainer"])
        self.loaders.train.generator.set_state(state["train_order"])
        self.history = RunHistory(**state["history"])
        set_rng_state(state["rng"])

    def train_epoch(self) -> None:
        """One pass over the training data (teleporting when the schedule says), then evaluation."""
        epoch = self.trainer.epoch
        started, cpu_started = time.perf_counter(), time.process_time()
        for inputs, targets in self.loaders.train:
            result = self.trainer.step(inputs, targets)
            self.writer.add_scalar("train/batch_loss", result.loss, self.trainer.global_step)
            for report in result.teleports:
                self._log_teleport(report, epoch)
        self.trainer.end_epoch()
        self._record(
            seconds=self.history.seconds[-1] + time.perf_counter() - started,
            cpu_seconds=self.history.cpu_seconds[-1] + time.process_time() - cpu_started,
        )

    def _log_teleport(self, report: TeleportReport, epoch: int) -> None:
        # At the global step, as train/batch_loss: the teleport came before that step's update.
        step = self.trainer.global_step
        gain = (
            report.gain if report.grad_norm_before > 0 else 1.0
        )
        self.history.teleport_seconds += report.seconds
        self.history.teleports.append(
            {
                "epoch": epoch,
                "step": step,
                "loss_before": report.loss_before,
                "loss_after": report.loss_after,
                "loss_change": report.loss_change,
                "grad_norm_before": report.grad_norm_before,
                "grad_norm_after": report.grad_norm_after,
                "grad_norm_gain": gain,
                "steps": report.steps,
                "stopped": report.stopped,
                "seconds": report.seconds,
            }
        )
        self.writer.add_scalar("teleport/grad_norm_gain", gain, step)
        self.writer.add_scalar("teleport/grad_norm_after", report.grad_norm_after, step)
        self.writer.add_scalar("teleport/loss_change", report.loss_change, step)
        self.writer.add_scalar("teleport/seconds", report.seconds, step)

    def _record(self, seconds: float, cpu_seconds: float) -> None:
        epoch = self.trainer.epoch
        history = self.history
        history.train_loss.append(
            evaluate_loss(self.model, self.loaders.eval_train, self.loss_fn, self.device)
        )
        history.test_loss.append(
            evaluate_loss(self.model, self.loaders.eval_test, self.loss_fn, self.device)
        )
        history.seconds.append(seconds)
        history.cpu_seconds.append(cpu_seconds)
        self.writer.add_scalar("train/loss", history.train_loss[-1], epoch)
        self.writer.add_scalar("test/loss", history.test_loss[-1], epoch)
        self.writer.add_scalar("time/seconds", seconds, epoch)
        self.writer.add_scalar("time/cpu_seconds", cpu_seconds, epoch)
        self.writer.add_scalar("time/teleport_seconds", history.teleport_seconds, epoch)

    def close(self) -> None:
        self.writer.close()

    def result(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "optimizer": self.spec.optimizer["label"],
            "lr": self.spec.optimizer["lr"],
            "teleport": self.spec.teleport,
            "seed": self.spec.seed,
            "train_loss": self.history.train_loss,
            "test_loss": self.history.test_loss,
            "seconds": self.history.seconds,
            "cpu_seconds": self.history.cpu_seconds,
            "teleport_seconds": self.history.teleport_seconds,
            "teleports": self.history.teleports,
        }


RANK_STATE = ("trainer", "train_order", "rng")
"""The parts of a run's state that differ between data-parallel ranks (weights do not)."""


def train_all(
    setup: TrainSetup, out_dir: Path, on_epoch_end: Callable[[Run], None] | None = None
) -> list[dict]:
    """Every run of the experiment, one after the other, epoch by epoch.

    Every ``checkpoint.every`` epochs (and after a run's last epoch) the
    finished runs' results and the current run's state are saved to
    ``out_dir/checkpoints`` (by rank 0); with ``checkpoint.resume`` the
    experiment continues from the newest checkpoint there.
    ``on_epoch_end(run)`` is called after each epoch (e.g. to stop early).
    """
    specs = list(setup.runs())
    epochs = setup.training["epochs"]
    checkpoint, folder = setup.config["checkpoint"], out_dir / "checkpoints"
    saved = load_checkpoint(folder) if checkpoint["resume"] else {"results": [], "run": None}
    results = saved["results"]
    if saved["run"] is not None:  # each rank continues its own data order and random state
        rank, world = rank_and_world()
        if len(saved["ranks"]) != world:
            raise CheckpointError(
                f"the checkpoint was written by {len(saved['ranks'])} ranks; resume with as many"
            )
        saved["run"] = {**saved["run"], **saved["ranks"][rank]}
    done = len(results) * epochs + (saved["run"]["trainer"]["epoch"] if saved["run"] else 0)
    with progress_bar(
        len(specs) * epochs, "train", unit="epoch", disable=not is_main_process()
    ) as bar:
        bar.update(done)
        for spec in specs[len(results) :]:
            bar.set_postfix_str(spec.name)
            run = Run(setup, spec, out_dir / "tensorboard", state=saved["run"])
            saved["run"] = None
            try:
                while run.trainer.epoch < epochs:
                    run.train_epoch()
                    bar.update(1)
                    epoch = run.trainer.epoch
                    if checkpoint["every"] and (
                        epoch % checkpoint["every"] == 0 or epoch == epochs
                    ):
                        state = run.state_dict()
                        ranks = all_gather_objects({key: state[key] for key in RANK_STATE})
                        if is_main_process():
                            state = {"results": results, "run": state, "ranks": ranks}
                            save_checkpoint(
                                folder,
                                state,
                                len(results) * epochs + epoch,
                                keep=checkpoint["keep"],
                            )
                        barrier()
                    if on_epoch_end is not None:
                        on_epoch_end(run)
            finally:
                run.close()
            results.append(run.result())
    return results


# -- summarising -----------------------------------------------------------------
def summarize(results: list[dict], target_loss: float | None) -> list[dict[str, Any]]:
    """One row per optimizer and teleport setting: means and spreads over seeds."""
    groups: dict[tuple[str, bool], list[dict]] = {}
    for result in results:
        groups.setdefault((result["optimizer"], result["teleport"]), []).append(result)
    rows = []
    for (optimizer, teleport), runs in groups.items():
        row: dict[str, Any] = {"optimizer": optimizer, "teleport": teleport, "seeds": len(runs)}
        for metric in ("train_loss", "test_loss"):
            row[f"final_{metric}_mean"], row[f"final_{metric}_std"] = mean_std(
                [r[metric][-1] for r in runs]
            )
        row["seconds_mean"], _ = mean_std([r["seconds"][-1] for r in runs])
        row["cpu_seconds_mean"], _ = mean_std([r["cpu_seconds"][-1] for r in runs])
        row["teleport_seconds_mean"], _ = mean_std([r["teleport_seconds"] for r in runs])
        gains = [t["grad_norm_gain"] for r in runs for t in r["teleports"]]
        row["grad_norm_gain_mean"] = mean_std(gains)[0] if gains else None
        reached = [
            first_reaching(r["train_loss"], target_loss) if target_loss is not None else None for r in runs
        ]
        hits = [(epoch, r) for epoch, r in zip(reached, runs, strict=True) if epoch is not None]
        row["target_reached"] = len(hits)
        row["epochs_to_target"] = [epoch for epoch, _ in hits]
        row["seconds_to_target"] = [r["seconds"][epoch] for epoch, r in hits]
        row["cpu_seconds_to_target"] = [r["cpu_seconds"][epoch] for epoch, r in hits]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], target_loss: float | None) -> str:
    target = f"loss <= {target_loss:g}" if target_loss is not None else "no target"
    header = [
        "optimizer",
        "teleport",
        "final train loss",
        "final test loss",
        f"epochs to train {target}",
        f"wall seconds to train {target}",
        f"CPU seconds to train {target}",
        "train seconds (wall / CPU)",
        "teleport seconds",
        "grad-norm gain",
    ]

    def reached(values: list[float], seeds: int, digits: int) -> str:
        if not values:
            return "not reached" if target_loss is not None else "-"
        text = format_mean_std(values, digits)
        return text if len(values) == seeds else f"{text} ({len(values)}/{seeds} seeds)"

    def loss(row: dict[str, Any], metric: str) -> str:
        mean, std = row[f"final_{metric}_mean"], row[f"final_{metric}_std"]
        return f"{mean:.4f} ± {std:.4f}" if row["seeds"] > 1 else f"{mean:.4f}"

    body = [
        [
            row["optimizer"],
            "yes" if row["teleport"] else "no",
            loss(row, "train_loss"),
            loss(row, "test_loss"),
            reached(row["epochs_to_target"], row["seeds"], 3),
            reached(row["seconds_to_target"], row["seeds"], 3),
            reached(row["cpu_seconds_to_target"], row["seeds"], 3),
            f"{row['seconds_mean']:.1f} / {row['cpu_seconds_mean']:.1f}",
            f"{row['teleport_seconds_mean']:.2f}",
            f"{row['grad_norm_gain_mean']:.2f}x" if row["grad_norm_gain_mean"] is not None else "-",
        ]
        for row in rows
    ]
    return markdown_table(header, body)


def loss_curves(results: list[dict]) -> dict:
    curves: dict[str, dict[str, dict[str, list]]] = {"train loss": {}, "test loss": {}}
    for result in results:
        line = "teleport" if result["teleport"] else "no teleport"
        for row, metric in (("train loss", "train_loss"), ("test loss", "test_loss")):
            curves[row].setdefault(result["optimizer"], {}).setdefault(line, []).append(
                result[metric]
            )
    return curves


# -- the experiment kind ---------------------------------------------------------
def run_train(config: dict[str, Any], out_dir: Path) -> None:
    """The ``train`` experiment kind: check, train every run, write results and print the table."""
    setup = prepare(config)
    threads = torch.get_num_threads()
    distributed = join_launch(setup.device)  # under torchrun: one rank of several
    try:
        if setup.config["threads"] is not None:
            torch.set_num_threads(setup.config["threads"])
        _train_and_report(setup, Path(out_dir))
    finally:
        torch.set_num_threads(threads)
        if distributed:
            leave_launch()


run_train.resolve_config = resolve_config  # what `teleport config` prints for this kind


def _train_and_report(setup: TrainSetup, out_dir: Path) -> None:
    main = is_main_process()  # rank 0 alone writes files and prints
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        fresh = {**setup.config, "checkpoint": {**setup.config["checkpoint"], "resume": False}}
        (out_dir / "config.toml").write_text(dumps_toml(fresh), encoding="utf-8")
        print(f"{setup.splits.description}; {len(list(setup.runs()))} runs -> {out_dir}")
    results = train_all(setup, out_dir)
    if not main:
        return
    target = setup.training["target_loss"]
    rows = summarize(results, target)
    markdown = table(rows, target)
    write_json(
        out_dir / "results.json",
        {
            "config": setup.config,
            "dataset": setup.splits.description,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "device": str(setup.device),
            },
            "summary": rows,
            "runs": results,
        },
    )
    (out_dir / "table.md").write_text(markdown, encoding="utf-8")
    plot_curves(loss_curves(results), out_dir / "loss_curves.png")
    print(markdown, end="")


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment("train", run_train)

