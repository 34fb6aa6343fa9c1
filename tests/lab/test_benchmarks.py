"""Every benchmark runs at a tiny size and writes well-formed JSON and a PNG. Nothing here looks at
how long anything took: timings are the benchmarks' output, never a test's condition."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from torch_teleport.lab.benchmarks import time_to_target
from torch_teleport.lab.benchmarks.common import growth_exponent, settings
from torch_teleport.lab.cli import main as teleport_cli
from torch_teleport.lab.config import ConfigError
from torch_teleport.registry import default_registry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tiny(name: str, tmp_path: Path) -> dict:
    figures = tmp_path / "figures"
    default_registry().get("experiment", f"bench.{name}")(
        {"kind": f"bench.{name}", "size": "tiny", "figures": str(figures)}, tmp_path / "out"
    )
    assert_png(figures / f"bench_{name}.png")
    return load(tmp_path / "out" / f"{name}.json", name)


def load(path: Path, name: str) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["benchmark"] == name
    assert data["settings"]["size"] == "tiny"
    assert {"cpu", "cores", "threads", "torch", "device", "clock"} <= set(data["machine"])
    assert_finite(data)
    return data


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"


def assert_finite(value, where: str = "") -> None:
    """Every number in the JSON is finite (non-finite numbers would have been written as null)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_finite(item, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), where


def numbers(*values) -> None:
    """Key results: present, numeric and finite (not null)."""
    for value in values:
        assert (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ), value


def test_step_cost(tmp_path):
    data = run_tiny("step_cost", tmp_path)
    paper = data["paper_mlp"]
    assert paper["model"] == "mlp" and paper["input_shape"] == [8, 784]
    numbers(
        paper["sgd_seconds"], paper["ascent_seconds"], paper["basis_seconds"], paper["full_ascent_seconds"]
    )
    numbers(paper["ascent_over_sgd"], paper["basis_over_sgd"], data["target_ascent_over_sgd"])
    numbers(paper["full_ascent_over_sgd"], paper["teleport_over_sgd_steps"])
    assert 0 < paper["ascent_flops_over_sgd"] < 10  # the closed form's products, counted
    assert paper["paths"] == "closed_form"
    assert paper["null_space"] == "exact" and paper["moved_sites"] == paper["sites"] == 3
    numbers(paper["defaults_seconds"], paper["defaults_over_sgd_steps"], paper["defaults_report"]["gain"])
    assert paper["defaults_report"]["guard"] == data["settings"]["guard"]
    assert data["models"][0] == paper
    assert data["profile"] and all(row["op"] and row["calls"] > 0 for row in data["profile"])


def test_gradient_paths(tmp_path):
    data = run_tiny("gradient_paths", tmp_path)
    assert [info["model"] for info in data["models"]] == ["mlp"]
    assert data["models"][0]["input_shape"] == [4, 784] and data["models"][0]["batchnorm"] is False
    rows = data["rows"]
    assert [(row["model"], row["tau"], row["gradient"]) for row in rows] == [
        ("mlp", 0.99, "structured"),
        ("mlp", 0.99, "full"),
    ]
    for row in rows:
        assert "error" not in row
        numbers(row["loss_change"], row["held_out_change"], row["gain"], row["seconds"])
        numbers(row["held_out_per_log_gain"], row["loss_change_per_log_gain"])
        assert 1 <= row["steps"] <= 8 and row["stopped"] and row["rolled_back"] == 0
        assert row["paths"] == [row["gradient"]]
        assert row["gain"] > 1
        assert [run["seed"] for run in row["seeds"]] == [0]
        assert row["seeds"][0]["gain"] == row["gain"]
    (summary,) = data["summary"]
    assert summary["tau"] == 0.99 and summary["models"] == 1
    ratios = summary["structured_over_full"]
    numbers(ratios["loss_change"], ratios["held_out_change"], ratios["gain"])
    numbers(ratios["loss_change_per_log_gain"], ratios["held_out_per_log_gain"])
    assert ratios["gain"] == pytest.approx(rows[0]["gain"] / rows[1]["gain"])
    assert set(summary["drifts_less"].values()) <= {"structured", "full", "tie"}
    assert summary["verdict"].startswith("tau = 0.99") and data["verdict"]


def test_scaling(tmp_path):
    data = run_tiny("scaling", tmp_path)
    assert set(data["sweeps"]) == {"t", "d", "n", "l", "b"}
    for variable, points in data["sweeps"].items():
        assert [p[variable] for p in points] == data["settings"][
            {"t": "steps", "d": "widths", "n": "batch_sizes", "l": "depths", "b": "batches"}[
                variable
            ]
        ]
        for point in points:
            numbers(point["null_space"], point["symmetry"], point["ratio"])
            assert point["ratio"] == pytest.approx(point["symmetry"] / point["null_space"])
    for variable in ("d", "n"):
        numbers(data["exponents"][variable]["null_space"], data["exponents"][variable]["symmetry"])
    numbers(data["paper_setting"]["ratio"])
    assert isinstance(data["target_met"], bool)


def test_accuracy(tmp_path):
    data = run_tiny("accuracy", tmp_path)
    assert list(data["methods"]) == [
        "null-space, tau = 1",
        "null-space, tau = 0.9",
        "symmetry",
        "level-set",
    ]
    for result in data["methods"].values():
        assert [row["steps"] for row in result["by_steps"]] == [1, 2]
        for row in result["by_steps"]:
            numbers(row["batch_loss_change"], row["held_out_loss_change"], row["grad_norm_gain"])
        assert len(result["batch_loss_change_per_step"]) == 2
    exact = data["methods"]["null-space, tau = 1"]["by_steps"][-1]
    assert exact["batch_loss_change"] <= 1e-5  # float32, tau = 1


def test_error_control(tmp_path):
    data = run_tiny("error_control", tmp_path)
    sites = data["layers"]["mlp"]
    assert [site["site"] for site in sites] == ["1.weight", "3.weight", "5.weight"]
    for site in sites:
        fractions = site["energy_fraction"]
        assert all(b >= a - 1e-12 for a, b in zip(fractions, fractions[1:], strict=False))
        assert fractions[-1] == pytest.approx(1.0)
        assert site["core_rank"]["1.0"] >= site["core_rank"]["0.9"]
    for tau, run in data["trajectories"]["0.02"].items():
        assert len(run["loss"]) == len(run["grad_norm"]) == 3, tau
        numbers(*run["loss"], *run["grad_norm"])


def test_time_to_target(tmp_path):
    """Every arm over the same rate grid from the same seeds; the summary follows from the runs."""
    data = run_tiny("time_to_target", tmp_path)
    settings_used = data["settings"]
    (pair,) = settings_used["pairs"]
    by_optimizer = data["pairs"][pair]
    assert list(by_optimizer) == settings_used["optimizers"] == ["sgd", "adam"]
    for optimizer, summary in by_optimizer.items():
        runs = summary["runs"]
        expected_arms = ["none", "teleport", "reset", "spike"] + (["sharpness"] if optimizer == "sgd" else [])
        assert list(runs) == list(summary["arms"]) == expected_arms
        for arm, by_rate in runs.items():
            assert len(by_rate) == len(settings_used["multipliers"]), arm
            for seeds in by_rate.values():
                for run in seeds:
                    assert len(run["train_loss"]) == len(run["cpu_seconds"]) == settings_used["epochs"] + 1
                    numbers(*run["train_loss"], *run["cpu_seconds"], run["teleport_cpu"])
                    if arm != "spike":  # (which teleports only where the loss spikes)
                        assert (run["teleported_at"] != []) == (arm in ("teleport", "sharpness"))
        for arm, figures in summary["arms"].items():
            by_rate = runs[arm]
            best = min(by_rate, key=lambda r: sum(run["train_loss"][-1] for run in by_rate[r]))
            assert figures["best_lr"] == float(best)
        best_plain = runs["none"][f"{summary['arms']['none']['best_lr']:g}"]
        assert summary["target"] == pytest.approx(sum(r["train_loss"][-1] for r in best_plain) / len(best_plain))
        assert summary["verdict"].startswith("nothing beats" if not any(a["wins"] for a in summary["arms"].values()) else summary["verdict"].split(" beats")[0])
    # Plain SGD keeps no optimizer state: clearing it where the teleport arm teleported changes nothing.
    sgd = by_optimizer["sgd"]["runs"]
    for rate, seeds in sgd["none"].items():
        assert [r["train_loss"] for r in seeds] == [r["train_loss"] for r in sgd["reset"][rate]]


@pytest.mark.parametrize("arms", [["teleport", "spike"], ["none", "warp"]])
def test_time_to_target_refuses_a_grid_without_plain_training_or_with_an_unknown_arm(arms):
    options = settings({"kind": "bench.time_to_target", "size": "tiny", "arms": arms}, time_to_target.FULL, time_to_target.TINY)
    with pytest.raises(ConfigError, match="arms: plain training"):
        time_to_target._check(options)


def test_time_to_target_goes_on_from_what_an_interrupted_run_measured(tmp_path, capsys):
    """A partial file made with the same options keeps its pairs; one made with others is ignored."""
    first = run_tiny("time_to_target", tmp_path / "first")
    (pair,) = first["settings"]["pairs"]
    options = settings({"kind": "bench.time_to_target", "size": "tiny"}, time_to_target.FULL, time_to_target.TINY)
    partial = tmp_path / "again" / "out" / "time_to_target.partial.json"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"options": time_to_target._grid(options), "pairs": first["pairs"]}))
    again = run_tiny("time_to_target", tmp_path / "again")
    assert f"{pair} kept from" in capsys.readouterr().out
    assert again["pairs"] == first["pairs"]  # CPU seconds included: nothing was trained again
    assert not partial.exists()
    other = {**time_to_target._grid(options), "seeds": [7]}
    partial.write_text(json.dumps({"options": other, "pairs": first["pairs"]}))
    assert time_to_target._measured(partial, options) == {}
    partial.write_text("{not json")
    assert time_to_target._measured(partial, options) == {}


def test_trainer_defaults(tmp_path):
    """Each arm against plain training of its optimizer and seed; only teleporting arms teleport."""
    data = run_tiny("trainer_defaults", tmp_path)
    arms = data["datasets"]["digits"]
    assert list(arms) == [
        "sgd, plain", "sgd, plain, lr x2", "sgd, defaults", "sgd, paper (32 x 8 before epochs 0-4)",
        "adam, plain", "adam, defaults",
    ]  # fmt: skip
    for arm, summary in arms.items():
        (run,) = summary["runs"]
        assert len(run["train_loss"]) == len(run["cpu_seconds"]) == data["settings"]["epochs"] + 1
        numbers(*run["train_loss"], *run["cpu_seconds"])
        teleports = "plain" not in arm
        assert (summary["teleports"] != [0]) == teleports and (run["gains"] != []) == teleports
        if arm.endswith("plain"):
            assert summary["epoch_ratio"] == summary["final_ratio"] == summary["time_ratio"] == [1.0]
    assert arms["sgd, paper (32 x 8 before epochs 0-4)"]["teleports"] == [32]


def test_default_vs_paper(tmp_path):
    """Both teleports from every point; the count below the paper's follows from the rows."""
    from torch_teleport.lab.benchmarks.model_coverage import below_paper

    data = run_tiny("default_vs_paper", tmp_path)
    rows = data["rows"]
    assert [(r["model"], r["point"]) for r in rows] == [("mlp", "initialisation"), ("mlp", "trained")]
    for row in rows:
        numbers(row["gain"], row["paper_gain"], row["batch_loss_change"], row["paper_batch_loss_change"])
        assert row["gain"] >= 1 - 1e-6  # the default's search takes only steps that raise the objective
        assert row["steps"] <= data["settings"]["steps"] and row["paper_steps"] <= data["settings"]["steps"]
    assert data["below_paper"] == sum(map(below_paper, rows)) and data["runs"] == len(rows)


def test_time_to_target_refuses_a_grid_without_positive_multipliers(tmp_path):
    run = default_registry().get("experiment", "bench.time_to_target")
    for grid in ([], [0.0, 1.0]):
        with pytest.raises(ConfigError, match="multipliers"):
            run({"kind": "bench.time_to_target", "size": "tiny", "multipliers": grid}, tmp_path)


def test_teleport_bench_command_runs_a_benchmark(tmp_path):
    status = teleport_cli(
        [
            "bench",
            "scaling",
            "--set",
            "size=tiny",
            "--set",
            f"figures={tmp_path}",
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0
    load(tmp_path / "scaling.json", "scaling")
    assert_png(tmp_path / "bench_scaling.png")


def test_the_script_runs_the_same_benchmark(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch_teleport.lab.benchmarks.step_cost",
            "--set",
            "size=tiny",
            "--out",
            str(tmp_path),
            "--figures",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "ascent step" in completed.stdout
    load(tmp_path / "step_cost.json", "step_cost")
    assert_png(tmp_path / "bench_step_cost.png")


def test_settings_refuse_unknown_keys_and_apply_the_tiny_defaults():
    full, tiny = {"repeats": 5, "widths": [1, 2]}, {"repeats": 1}
    assert settings({"size": "tiny"}, full, tiny)["repeats"] == 1
    assert settings({"size": "tiny", "repeats": 3}, full, tiny)["repeats"] == 3
    with pytest.raises(ConfigError, match="unknown key 'repeat'"):
        settings({"repeat": 3}, full, tiny)
    with pytest.raises(ConfigError, match="widths"):
        settings({"widths": 3}, full, tiny)


def test_growth_exponent_recovers_a_power_law():
    sizes = [64, 128, 256, 512]
    assert growth_exponent(sizes, [3e-6 * s**1.7 for s in sizes]) == pytest.approx(1.7)


def test_model_coverage_counts_a_gain_below_the_papers_unless_both_landed_on_the_gain_limit():
    from torch_teleport.lab.benchmarks.model_coverage import BELOW_PAPER, totals

    def row(gain, stopped, paper_gain, paper_stopped):
        return {"family": "f", "mode": "train", "outcome": "backtracked", "gain": gain, "stopped": stopped,
                "paper_gain": paper_gain, "paper_stopped": paper_stopped}

    rows = [
        row(9.92, "gain", 9.94, "gain"),  # both on the limit, within its landing band
        row(2.0, "drift", 3.0, "steps"),  # less
        row(9.92, "gain", 9.99, "steps"),  # less (the paper's did not stop on the limit)
        row(3.0, "steps", 2.0, "steps"),
        {"family": "f", "mode": "train", "outcome": "fails", "paper_gain": 2.0},
    ]
    assert totals(rows)["f / train"][BELOW_PAPER] == 2


def test_optimizer_state_runs_every_policy_on_its_schedule():
    """One short run per policy: the teleporting ones teleport (the schedule is the gaining one for
    every family, so Adam's state exists at a later event), the losses are finite."""
    from torch_teleport.lab.benchmarks import optimizer_state
    from torch_teleport.lab.benchmarks.data_level_set import splits

    data = splits("digits")
    runs = {policy: optimizer_state.run(data, 0, "adam", policy, width=16, epochs=1) for policy in optimizer_state.POLICIES}
    assert all(len(run["train_loss"]) == 2 and all(math.isfinite(v) for v in run["train_loss"]) for run in runs.values())
    assert runs["none"]["teleport_steps"] == 0 and all(runs[p]["teleport_steps"] > 0 for p in ("keep", "reset", "rescale"))
