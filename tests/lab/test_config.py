"""Configs: reading TOML, ``--set`` overrides, schema checks that name the key, and writing TOML back."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torch_teleport import build_registry
from torch_teleport.lab.config import (
    OPTIONS,
    REQUIRED,
    ConfigError,
    Option,
    Table,
    TableList,
    apply_overrides,
    at_least,
    dumps_toml,
    interval,
    load_config,
    parse_value,
    positive,
    resolve,
    tomllib,
)
from torch_teleport.lab.train import SCHEMA, resolve_config

SMALL = Table(
    {
        "name": Option(REQUIRED, str),
        "rate": Option(0.5, float),
        "count": Option(3, int, check=at_least(1)),
        "seeds": Option([0], list, items=int),
        "cap": Option(None, float, check=positive),
        "share": Option(None, float, check=interval(0, 1, open_low=True)),
        "null_space": Option("nowhere", str, plugin="null_space"),
        "options": OPTIONS,
        "inner": Table({"flag": Option(False, bool)}),
        "items": TableList(Table({"size": Option(REQUIRED, int)}), default=[]),
    }
)


def test_the_embedded_default_is_a_valid_train_config():
    config = resolve(load_config(), SCHEMA)
    assert config["kind"] == "train"
    assert config["dataset"]["name"] == "digits"
    optimizers = config["training"]["optimizers"]
    assert [o["name"] for o in optimizers] == ["sgd", "momentum", "adagrad", "adagrad", "adam", "adam"]
    assert len({o["label"] or o["name"] for o in optimizers}) == len(optimizers)  # each run named apart
    assert config["training"]["with_teleport"] == [False, True]
    assert config["teleport"]["schedule"]["name"] == "auto"  # the library's default for each optimizer


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_invalid_toml_names_the_file_and_the_position(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[training]\nepochs = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)


def test_a_directory_or_undecodable_file_is_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(binary)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", 5),
        ("-0.25", -0.25),
        ("1e-3", 1e-3),
        ("true", True),
        ("[0, 1, 2]", [0, 1, 2]),
        ('"quoted"', "quoted"),
        ("{ hidden = [8] }", {"hidden": [8]}),
        ("mnist", "mnist"),
        ("data/mnist files", "data/mnist files"),
        ("1\nextra = 2", "1\nextra = 2"),
        ("", ""),
    ],
)
def test_set_values_are_toml_literals_or_strings(text, value):
    assert parse_value(text) == value


def test_overrides_create_nested_tables_and_leave_the_original_alone():
    config = {"training": {"epochs": 3}}
    result = apply_overrides(
        config, ["training.epochs=5", "model.options.hidden=[8, 8]", "dataset.name = mnist"]
    )
    assert result == {
        "training": {"epochs": 5},
        "model": {"options": {"hidden": [8, 8]}},
        "dataset": {"name": "mnist"},
    }
    assert config == {"training": {"epochs": 3}}


@pytest.mark.parametrize("override", ["epochs", "=3", "training..epochs=1", "training.=1", " =1"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(ConfigError, match="bad --set"):
        apply_overrides({}, [override])


def test_an_override_below_a_value_names_that_value():
    with pytest.raises(
        ConfigError, match="training.epochs is 3 \\(an integer\\), not a table"
    ) as caught:
        apply_overrides({"training": {"epochs": 3}}, ["training.epochs.max=1"])
    assert caught.value.key == "training.epochs"


def test_resolve_fills_defaults_and_converts_integers_to_floats():
    config = resolve({"name": "a", "rate": 2, "options": {"anything": [1]}}, SMALL)
    assert config == {
        "name": "a",
        "rate": 2.0,
        "count": 3,
        "seeds": [0],
        "cap": None,
        "share": None,
        "null_space": "nowhere",  # a default is the schema's own: never looked up
        "options": {"anything": [1]},
        "inner": {"flag": False},
        "items": [],
    }
    assert isinstance(config["rate"], float)


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        (
            {"name": "a", "rte": 1.0},
            "rte",
            "unknown key 'rte'; known keys at the top level: cap, count,",
        ),
        (
            {"name": "a", "inner": {"flg": True}},
            "inner.flg",
            "unknown key 'inner.flg'; known keys in [inner]: flag",
        ),
        ({}, "name", "missing key 'name'"),
        ({"name": 3}, "name", "name must be a string, got 3 (an integer)"),
        ({"name": "a", "count": True}, "count", "count must be an integer, got True (a boolean)"),
        ({"name": "a", "count": 0}, "count", "count must be at least 1, got 0"),
        ({"name": "a", "cap": 0}, "cap", "cap must be a positive finite number, got 0.0"),
        ({"name": "a", "cap": math.inf}, "cap", "cap must be a positive finite number, got inf"),
        ({"name": "a", "share": 1.5}, "share", "share must lie in (0, 1], got 1.5"),
        ({"name": "a", "share": 0}, "share", "share must lie in (0, 1], got 0.0"),
        ({"name": "a", "rate": "fast"}, "rate", "rate must be a number, got 'fast' (a string)"),
        ({"name": "a", "seeds": [0, "1"]}, "seeds[1]", "seeds[1] must be an integer"),
        ({"name": "a", "inner": 5}, "inner", "inner must be a table, got 5 (an integer)"),
        ({"name": "a", "items": [{"size": 1}, {}]}, "items[1].size", "missing key 'items[1].size'"),
        (
            {"name": "a", "items": {"size": 1}},
            "items",
            "items must be an array of tables, got a table",
        ),
    ],
)
def test_resolve_names_the_key_at_fault(config, key, message):
    with pytest.raises(ConfigError) as caught:
        resolve(config, SMALL)
    assert caught.value.key == key
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@given(low=st.floats(-10, 10), width=st.floats(0, 10), value=st.floats(allow_nan=True))
def test_an_interval_admits_exactly_its_numbers(low, width, value):
    high = low + width
    assert (interval(low, high)(value) is None) == (low <= value <= high)
    assert (interval(low, high, open_low=True)(value) is None) == (low < value <= high)


def test_plugin_names_are_checked_against_the_registry_given():
    registry = build_registry()
    assert resolve({"name": "a", "null_space": "svd"}, SMALL, registry)["null_space"] == "svd"
    with pytest.raises(ConfigError) as caught:
        resolve({"name": "a", "null_space": "qr"}, SMALL, registry)
    known = ", ".join(map(repr, registry.names("null_space")))
    assert str(caught.value) == f"null_space must be a registered null space ({known}), got 'qr'"
    assert caught.value.key == "null_space"
    registry.add_null_space("qr", object)
    assert resolve({"name": "a", "null_space": "qr"}, SMALL, registry)["null_space"] == "qr"
    assert resolve({"name": "a", "null_space": "qr"}, SMALL)["null_space"] == "qr"  # no registry


def _train_config(**teleport) -> dict:
    config = load_config()
    config["teleport"].update(teleport)
    return config


numbers = st.floats(allow_nan=True) | st.integers(-3, 3)


@given(tau=numbers)
def test_tau_is_a_share_of_the_energy(tau):
    if 0 < tau <= 1:
        assert resolve_config(_train_config(tau=tau))["teleport"]["tau"] == tau
    else:
        allowed = r"^teleport\.tau must lie in \(0, 1\], got "
        with pytest.raises(ConfigError, match=allowed) as caught:
            resolve_config(_train_config(tau=tau))
        assert caught.value.key == "teleport.tau"


@pytest.mark.parametrize("key", ["lr", "cap"])
@given(value=numbers)
def test_teleport_rates_and_caps_are_positive_and_finite(key, value):
    if math.isfinite(value) and value > 0:
        assert resolve_config(_train_config(**{key: value}))["teleport"][key] == value
    else:
        with pytest.raises(ConfigError, match=f"^teleport.{key} must be a positive finite number"):
            resolve_config(_train_config(**{key: value}))


@given(value=numbers)
def test_the_loss_change_tolerance_is_not_negative(value):
    if value >= 0:
        resolve_config(_train_config(max_loss_change=value))
    else:
        with pytest.raises(ConfigError, match="^teleport.max_loss_change must be at least 0"):
            resolve_config(_train_config(max_loss_change=value))


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("model.name", "model"),
        ("dataset.name", "dataset"),
        ("teleport.method", "method"),
        ("teleport.objective", "objective"),
        ("teleport.null_space", "null_space"),
        ("teleport.schedule.name", "schedule"),
    ],
)
def test_every_plugin_name_of_a_train_config_is_looked_up(key, kind):
    registry = build_registry()
    config = apply_overrides(load_config(), [f"{key}=nothing_by_this_name"])
    with pytest.raises(ConfigError) as caught:
        resolve_config(config, registry)
    assert caught.value.key == key
    names = registry.names(kind)
    assert str(caught.value).startswith(f"{key} must be a registered {kind.replace('_', ' ')} (")
    assert all(repr(name) in str(caught.value) for name in names) and names


toml_keys = st.text(min_size=0, max_size=8)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(toml_keys, inner, max_size=3),
    max_leaves=10,
)


@given(
    st.dictionaries(toml_keys, values | st.dictionaries(toml_keys, values, max_size=4), max_size=5)
)
def test_written_toml_reads_back_as_the_same_config(config):
    assert tomllib.loads(dumps_toml(config)) == config


def test_none_values_are_left_out_and_infinities_survive():
    text = dumps_toml(
        {"cap": None, "teleport": {"cap": None, "lr": math.inf, "o": {"a": None, "b": -math.inf}}}
    )
    assert tomllib.loads(text) == {"teleport": {"lr": math.inf, "o": {"b": -math.inf}}}


def test_unset_values_can_be_shown_as_comments():
    config = {"cap": None, "kind": "x", "teleport": {"cap": None, "lr": 0.5, "o": {"a": None, "b": 1}}}
    text = dumps_toml(config, unset=True)
    lines = text.splitlines()
    assert "# cap: not set" in lines and lines.count("# cap: not set") == 2
    assert lines.index("[teleport]") < lines.index("# cap: not set", 2)  # under its section
    assert tomllib.loads(text) == tomllib.loads(dumps_toml(config)) == {
        "kind": "x",
        "teleport": {"lr": 0.5, "o": {"b": 1}},
    }
    assert "# " not in dumps_toml(config)


@given(
    st.dictionaries(toml_keys, values | st.none() | st.dictionaries(toml_keys, values | st.none(), max_size=4), max_size=5)
)
def test_comments_for_unset_values_keep_the_toml_valid(config):
    assert tomllib.loads(dumps_toml(config, unset=True)) == tomllib.loads(dumps_toml(config))
