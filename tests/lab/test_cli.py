"""The ``teleport`` command, run in-process on a tiny config, and its one-line errors."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import torch_teleport
from torch_teleport import Teleporter, build_registry
from torch_teleport.core_space import DEFAULT_NULL_SPACE
from torch_teleport.lab import cli as cli_module
from torch_teleport.lab.cli import main
from torch_teleport.lab.config import apply_overrides, load_config, tomllib
from torch_teleport.lab.train import resolve_config
from torch_teleport.plugin_manager import BUILTIN_ORIGIN
from torch_teleport.plugins.null_spaces.threshold import ThresholdNullSpace
from torch_teleport.projectors.frozen import EmbeddingPolicy

DEFAULT_TAU = ThresholdNullSpace().tau

TINY = """
threads = 1

[model]
name = "mlp"
options = { input_dim = 64, hidden = [16], output_dim = 10 }

[dataset]
name = "digits"

[training]
epochs = 1
batch_size = 64
seeds = [0]
target_loss = 100.0
optimizers = [{ name = "sgd", lr = 0.1 }, { name = "adam", lr = 0.001 }]

[teleport]
steps = 2
batch_size = 8
schedule = { name = "epochs", options = { epochs = [0], batches = 1 } }
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_run_writes_every_output(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sgd | yes |" in printed and "| adam | no |" in printed
    assert f"outputs in {out}" in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"config", "dataset", "machine", "summary", "runs"}
    assert [(r["optimizer"], r["teleport"]) for r in results["runs"]] == [
        ("sgd", False),
        ("sgd", True),
        ("adam", False),
        ("adam", True),
    ]
    for run in results["runs"]:
        for key in ("train_loss", "test_loss", "seconds", "cpu_seconds"):
            assert len(run[key]) == 2 and all(math.isfinite(v) for v in run[key]), (key, run[key])
        assert run["seconds"][0] == 0.0 < run["seconds"][1]
        assert run["train_loss"][1] < run["train_loss"][0]
        if run["teleport"]:
            (teleport,) = run["teleports"]
            assert teleport["epoch"] == 0 and 1 <= teleport["steps"] <= 2  # the config's 2 at most
            # The default teleport ends early only at a limit, with the batch loss kept to 1e-5.
            assert teleport["steps"] == 2 or teleport["stopped"] in ("drift", "guard", "line_search")
            assert teleport["loss_change"] <= 1e-5
            assert math.isfinite(teleport["grad_norm_gain"]) and teleport["grad_norm_gain"] > 1
            assert 0 < run["teleport_seconds"] <= run["seconds"][1]
        else:
            assert run["teleports"] == [] and run["teleport_seconds"] == 0
    for row in results["summary"]:
        assert row["target_reached"] == 1 and row["epochs_to_target"] == [0]
        assert all(math.isfinite(row[k]) for k in ("final_train_loss_mean", "final_test_loss_mean"))

    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 4 and table in printed

    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["training"]["seeds"] == [0]
    # The teleporter's own default (None: the step-length search), which TOML writes by leaving it out.
    assert resolved["teleport"].get("lr") == inspect.signature(Teleporter).parameters["lr"].default
    assert resolved == _without_none(results["config"])

    for name in ("sgd-plain-seed0", "sgd-teleport-seed0"):
        events = EventAccumulator(str(out / "tensorboard" / name))
        events.Reload()
        scalars = events.Tags()["scalars"]
        assert {"train/loss", "test/loss", "time/seconds", "train/batch_loss"} <= set(scalars)
        losses = [event.value for event in events.Scalars("train/loss")]
        assert losses == pytest.approx(
            next(r for r in results["runs"] if r["name"] == name)["train_loss"]
        )
    events = EventAccumulator(str(out / "tensorboard" / "sgd-teleport-seed0"))
    events.Reload()
    assert "teleport/grad_norm_gain" in events.Tags()["scalars"]


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def test_the_resolved_config_runs_again(tiny, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert (
        main(
            [
                "run",
                str(tiny),
                "--out",
                str(first),
                "--set",
                "training.optimizers=[{name='sgd', lr=0.1}]",
            ]
        )
        == 0
    )
    assert main(["run", str(first / "config.toml"), "--out", str(second)]) == 0
    runs = [json.loads((d / "results.json").read_text())["runs"] for d in (first, second)]
    assert [r["train_loss"] for r in runs[0]] == [r["train_loss"] for r in runs[1]]


def test_plugins_lists_every_builtin_with_its_origin(capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kind", "name", "object", "from"]
    registry = build_registry()
    for entry in registry.entries():
        assert any(
            line.split()[:2] == [entry.kind, entry.name] and line.endswith(entry.origin)
            for line in lines
        )
    assert any(
        line.split()[:3] == ["experiment", "train", "torch_teleport.lab.train.run_train"]
        and line.endswith(BUILTIN_ORIGIN)
        for line in lines
    )


def test_the_installed_console_script_runs():
    script = Path(sys.executable).with_name("teleport")
    done = subprocess.run([str(script), "plugins"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "model" in done.stdout and BUILTIN_ORIGIN in done.stdout


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("teleport: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    message = _error(
        capsys, ["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out")]
    )
    assert f"config file '{tmp_path / 'missing.toml'}' does not exist" in message
    assert not (tmp_path / "out").exists()


def test_invalid_toml(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[training\nepochs = 1\n")
    message = _error(capsys, ["run", str(path)])
    assert str(path) in message and "not valid TOML" in message


def test_unknown_key_in_the_file_names_file_and_key(capsys, tiny, tmp_path):
    tiny.write_text(TINY.replace("epochs = 1", "epochs = 1\nepoch = 2"))
    message = _error(capsys, ["run", str(tiny), "--out", str(tmp_path / "out")])
    assert message.startswith(
        f"teleport: error: {tiny}: unknown key 'training.epoch'; known keys in [training]:"
    )
    assert not (tmp_path / "out").exists()


def test_unknown_key_from_set_names_the_override(capsys, tiny):
    message = _error(capsys, ["run", str(tiny), "--set", "teleport.step=3"])
    assert message.startswith("teleport: error: --set teleport.step=3: unknown key 'teleport.step'")


def test_bad_set(capsys, tiny):
    message = _error(capsys, ["run", str(tiny), "--set", "training.epochs"])
    assert "bad --set 'training.epochs': expected KEY=VALUE" in message


def test_bad_value_from_set_on_the_default_config(capsys):
    message = _error(capsys, ["run", "--set", "training.epochs=0"])
    assert (
        message
        == "teleport: error: --set training.epochs=0: training.epochs must be at least 1, got 0"
    )
    message = _error(capsys, ["run", "--set", "training.epoch=3"])
    assert "unknown key 'training.epoch'" in message


@pytest.mark.parametrize(
    ("override", "kind"),
    [
        ("model.name=perceptron", "model"),
        ("dataset.name=imagenet", "dataset"),
        ("teleport.objective=energy", "objective"),
        ("teleport.null_space=qr", "null_space"),
        ("teleport.schedule.name=sometimes", "schedule"),
        ("teleport.method=magic", "method"),
    ],
)
@pytest.mark.parametrize("command", [["run", "--out", "out"], ["config"]])
def test_unknown_plugin_names_list_the_registered_ones(
    capsys, tiny, tmp_path, monkeypatch, override, kind, command
):
    monkeypatch.chdir(tmp_path)
    key, _, name = override.partition("=")
    message = _error(capsys, [*command, str(tiny), "--set", override])
    registered = ", ".join(map(repr, build_registry().names(kind)))
    assert message == (
        f"teleport: error: --set {override}: {key} must be a registered "
        f"{kind.replace('_', ' ')} ({registered}), got {name!r}"
    )
    assert list(tmp_path.iterdir()) == [tiny]


def test_unknown_optimizer_and_kind_list_the_known_ones(capsys, tiny):
    override = "training.optimizers=[{name='lbfgs', lr=1}]"
    message = _error(capsys, ["run", str(tiny), "--set", override])
    assert message.endswith(
        "training.optimizers[0].name must be one of "
        "'adagrad', 'adam', 'momentum', 'rmsprop', 'sgd', got 'lbfgs'"
    )
    message = _error(capsys, ["run", str(tiny), "--set", "kind=dream"])
    assert "unknown experiment 'dream'; registered: " in message and "train" in message


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("teleport.tau=1.5", "teleport.tau must lie in (0, 1], got 1.5"),
        ("teleport.tau=0", "teleport.tau must lie in (0, 1], got 0.0"),
        ("teleport.tau=high", "teleport.tau must be a number, got 'high' (a string)"),
        ("teleport.lr=0", "teleport.lr must be a positive finite number, got 0.0"),
        ("teleport.lr=-0.01", "teleport.lr must be a positive finite number, got -0.01"),
        ("teleport.cap=inf", "teleport.cap must be a positive finite number, got inf"),
        ("teleport.max_loss_change=-1", "teleport.max_loss_change must be at least 0, got -1.0"),
        ("teleport.steps=0", "teleport.steps must be at least 1, got 0"),
    ],
)
def test_config_and_run_reject_a_bad_teleport_value_alike(
    capsys, tiny, tmp_path, override, problem
):
    """The key, the value and what is allowed, from ``config`` as from ``run``, before any work."""
    expected = f"teleport: error: --set {override}: {problem}"
    assert _error(capsys, ["config", str(tiny), "--set", override]) == expected
    out = tmp_path / "out"
    assert _error(capsys, ["run", str(tiny), "--set", override, "--out", str(out)]) == expected
    assert not out.exists()


def test_a_bad_value_in_the_file_names_the_file(capsys, tiny):
    tiny.write_text(TINY.replace("steps = 2", "steps = 2\ntau = 1.5"))
    for command in ("config", "run"):
        message = _error(capsys, [command, str(tiny)])
        assert message == f"teleport: error: {tiny}: teleport.tau must lie in (0, 1], got 1.5"


def test_plugin_option_errors_name_the_key(capsys, tiny):
    message = _error(capsys, ["run", str(tiny), "--set", "model.options.widths=[3]"])
    assert "model.options: building model 'mlp' failed:" in message and "widths" in message
    message = _error(
        capsys, ["run", str(tiny), "--set", "teleport.null_space=exact", "--set", "teleport.tau=0.5"]
    )
    assert "teleport: building the teleporter failed: the exact null space needs tau = 1" in message


def test_bench_with_an_unknown_name_lists_the_benchmarks(capsys, monkeypatch):
    registry = build_registry()
    registry.add_experiment("bench.alpha", lambda config, out_dir: None)
    registry.add_experiment("bench.beta", lambda config, out_dir: None)
    monkeypatch.setattr(cli_module, "default_registry", lambda: registry)
    message = _error(capsys, ["bench", "gamma"])
    benches = sorted(
        name.removeprefix("bench.")
        for name in registry.names("experiment")
        if name.startswith("bench.")
    )
    assert {"alpha", "beta"} <= set(benches)
    assert (
        message
        == f"teleport: error: unknown benchmark 'gamma'; registered benchmarks: {', '.join(benches)}"
    )


def test_bench_runs_the_registered_kind_with_overrides(capsys, monkeypatch, tmp_path):
    calls = []
    registry = build_registry()
    registry.add_experiment("bench.alpha", lambda config, out_dir: calls.append((config, out_dir)))
    monkeypatch.setattr(cli_module, "default_registry", lambda: registry)
    assert main(["bench", "alpha", "--set", "repeats=5", "--out", str(tmp_path)]) == 0
    assert calls == [({"kind": "bench.alpha", "repeats": 5}, tmp_path)]


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    installed = importlib.metadata.version("torch-teleport")
    assert capsys.readouterr().out == f"torch-teleport {installed}\n"
    assert installed == torch_teleport.__version__


def test_config_prints_the_resolved_default_and_runs_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["config"]) == 0
    printed = capsys.readouterr().out
    resolved = resolve_config(load_config())
    assert tomllib.loads(printed) == _without_none(resolved)
    assert resolved["teleport"]["cap"] is None and "# cap: not set" in printed.splitlines()
    assert resolved["training"]["optimizers"][0]["label"] == "sgd"  # labels filled in
    assert resolve_config(tomllib.loads(printed)) == resolved  # what it prints runs as it is
    assert list(tmp_path.iterdir()) == []


def test_config_applies_the_file_and_the_overrides(capsys, tiny):
    argv = ["config", str(tiny), "--set", "training.epochs=4", "--set", "teleport.cap=2.5"]
    assert main(argv) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    expected = resolve_config(
        apply_overrides(load_config(tiny), ["training.epochs=4", "teleport.cap=2.5"])
    )
    assert printed == _without_none(expected)
    assert printed["training"]["epochs"] == 4 and printed["teleport"]["cap"] == 2.5
    assert printed["teleport"]["batch_size"] == 8 and printed["training"]["eval_batch_size"] == 1024


def test_config_errors_are_one_line(capsys, tiny):
    message = _error(capsys, ["config", "--set", "training.epochs=0"])
    assert message == "teleport: error: --set training.epochs=0: training.epochs must be at least 1, got 0"
    message = _error(capsys, ["config", str(tiny), "--set", "training.epoch=3"])
    assert "unknown key 'training.epoch'" in message


def test_config_of_a_kind_without_a_resolver_is_printed_as_given(capsys, monkeypatch):
    registry = build_registry()
    registry.add_experiment("bench.alpha", lambda config, out_dir: None)
    monkeypatch.setattr(cli_module, "default_registry", lambda: registry)
    assert main(["config", "--set", "kind=bench.alpha", "--set", "repeats=3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# kind 'bench.alpha' does not resolve its config")
    assert tomllib.loads(printed)["repeats"] == 3


def _short(reason: str) -> str:
    return reason.split(":")[0]


def _table_rows(printed: str) -> dict[str, list[str]]:
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["module", "type", "status"])
    return {line.split()[0]: line.split() for line in lines[header + 1 :] if line.strip()}


def test_check_prints_the_table_of_a_registered_model(capsys):
    assert main(["check", "mlp"]) == 0
    printed = capsys.readouterr().out
    # The room a default teleport has: its own null space and tau.
    assert printed.startswith(
        "mlp on random normal inputs of shape (32, 784), "
        f"null space {DEFAULT_NULL_SPACE} (tau = {DEFAULT_TAU:g}):"
    )
    rows = _table_rows(printed)
    # The paper's 784-1024-1024-10 MLP on 32 samples: each layer's null space is its inputs + 1 - 32.
    assert rows["1"] == ["1", "Linear", "covered", "weight", "785", "753", "32"]
    assert rows["3"][3:] == ["weight", "1025", "993", "32"]
    assert rows["5"][3:] == ["weight", "1025", "993", "32"]
    assert printed.rstrip().endswith(
        "Sequential: 3 modules with trainable parameters: 3 covered, 0 frozen, 0 uncovered; "
        "3 of 3 sites have room on this batch of 32"
    )


def test_check_takes_model_options_batch_size_and_json(capsys):
    argv = ["check", "mlp", "--set", "input_dim=6", "--set", "hidden=[5]", "--batch", "4", "--json"]
    assert main([*argv, "--null-space", "exact"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "mlp" and data["type"] == "Sequential" and data["batch"] == 4
    assert data["null_space"] == "exact (tau = 1)"
    assert [(m["name"], m["sites"][0]["input_dim"], m["sites"][0]["null_dim"]) for m in data["modules"]] == [
        ("1", 7, 3),
        ("3", 6, 2),
    ]


def test_check_a_token_model_with_frozen_layers(capsys):
    argv = ["check", "transformer_lm", "--set", "vocab_size=50", "--set", "seq_len=6", "--batch", "2"]
    argv += ["--set", "layers=1", "--set", "heads=1", "--set", "head_dim=8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("transformer_lm on random token ids below 50, shape (2, 6)")
    rows = _table_rows(printed)
    assert " ".join(rows["embed"][1:]) == "Embedding frozen " + _short(EmbeddingPolicy.reason)
    assert rows["body.encoder.layers.0.norm1"][1:3] == ["LayerNorm", "frozen"]
    assert rows["head"][1:4] == ["Linear", "covered", "weight"]


def _check_json(capsys, argv: list[str]) -> dict:
    assert main(["check", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _null_dims(data: dict) -> dict[str, int]:
    return {m["name"]: m["sites"][0]["null_dim"] for m in data["modules"]}


def test_check_takes_the_model_and_the_teleport_options_of_a_run_config(capsys, tmp_path):
    """A 3-32-2 ReLU network on 64 samples: the batch fills every layer, so the default teleport
    builds its bases with the thresholded null space, which leaves the head far more room than the
    exact one; the table must use the null space the config's teleport would."""
    model = ["mlp", "--set", "input_dim=3", "--set", "hidden=[32]", "--batch", "64"]
    default = _check_json(capsys, model)
    exact = _check_json(capsys, [*model, "--null-space", "exact"])
    thresholded = _check_json(capsys, [*model, "--null-space", "svd"])
    assert default["null_space"] == f"{DEFAULT_NULL_SPACE} (tau = {DEFAULT_TAU:g})"
    assert thresholded["null_space"] == f"svd (tau = {DEFAULT_TAU:g})"
    assert _null_dims(default) == _null_dims(thresholded)
    assert _null_dims(default)["3"] > _null_dims(exact)["3"]
    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\nname = "mlp"\noptions = { input_dim = 3, hidden = [32] }\n\n'
        '[teleport]\nnull_space = "svd"\ntau = 1.0\n'
    )
    from_config = _check_json(capsys, ["--config", str(config), "--batch", "64"])
    assert from_config["model"] == "mlp" and from_config["null_space"] == "svd (tau = 1)"
    assert _null_dims(from_config) == _null_dims(exact)  # svd at tau = 1 is the exact null space
    # A MODEL and flags win over the config's.
    flagged = _check_json(capsys, [*model, "--config", str(config), "--tau", str(DEFAULT_TAU)])
    assert flagged["null_space"] == thresholded["null_space"]
    assert _null_dims(flagged) == _null_dims(thresholded)


def test_check_errors_name_the_null_space_and_the_missing_model(capsys, tmp_path):
    message = _error(capsys, ["check", "mlp", "--tau", "1.5"])
    assert message == (
        f"teleport: error: null space {DEFAULT_NULL_SPACE!r} with tau 1.5: tau must lie in (0, 1], "
        "got 1.5"
    )
    message = _error(capsys, ["check", "mlp", "--null-space", "fourier"])
    assert "unknown null space 'fourier'; registered: " in message and "exact" in message
    message = _error(capsys, ["check"])
    assert message == (
        "teleport: error: no MODEL given: give the registered model to check, "
        "e.g. teleport check mlp"
    )
    config = tmp_path / "teleport_only.toml"
    config.write_text('[teleport]\nnull_space = "exact"\n')
    message = _error(capsys, ["check", "--config", str(config)])
    assert message == (
        f"teleport: error: {config} has no [model] name: give the registered model to check, "
        "e.g. teleport check mlp"
    )
    config.write_text('teleport = 5\n[model]\nname = "mlp"\n')
    message = _error(capsys, ["check", "--config", str(config)])
    assert message == f"teleport: error: {config}: [teleport] must be a table, got 5"
    config.write_text('[model]\nname = "mlp"\noptions = 3\n')
    message = _error(capsys, ["check", "--config", str(config)])
    assert message == f"teleport: error: {config}: model.options must be a table, got 3"


def test_check_needs_a_shape_for_a_model_without_a_built_in_example(capsys, monkeypatch):
    registry = build_registry()
    registry.add_model("pair", lambda width=3: nn.Sequential(nn.Linear(width, 2), nn.Linear(2, 2)))
    monkeypatch.setattr(cli_module, "default_registry", lambda: registry)
    message = _error(capsys, ["check", "pair"])
    assert "no built-in example inputs for model 'pair': give the shape of one sample with --shape" in message
    assert main(["check", "pair", "--shape", "3", "--batch", "2"]) == 0
    assert _table_rows(capsys.readouterr().out)["0"][3:7] == ["weight", "4", "2", "2"]


def test_check_errors_are_one_line(capsys):
    message = _error(capsys, ["check", "perceptron"])
    assert "unknown model 'perceptron'; registered: " in message and "mlp" in message
    message = _error(capsys, ["check", "mlp", "--set", "widths=[3]"])
    assert "building model 'mlp' failed:" in message and "widths" in message
    message = _error(capsys, ["check", "mlp", "--shape", "5"])
    assert "running model 'mlp' on random normal inputs of shape (32, 5) failed:" in message
