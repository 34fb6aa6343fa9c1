"""How long a step is: the step rule, the line search's options and states, and what the search does
in a null-space teleport (it grows only where the sample saturates its core space or a guard batch
judges every step)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.line_search import (
    BREACHES,
    INITIAL_LR,
    LANDINGS,
    SHORTENING_HELPS,
    LineSearch,
    SearchState,
    StepRule,
    finite_positive,
)

positive = st.floats(1e-3, 1e3)


# -- the step rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_no_rate_searches_from_the_default_initial_step(normalize):
    rule = StepRule.of(None, normalize, ascend=True)
    assert rule.search == LineSearch() and rule.lr == INITIAL_LR == LineSearch().initial


def test_a_given_search_starts_at_its_initial_step_and_a_rate_searches_nothing():
    search = LineSearch(initial=0.02, retries=1)
    rule = StepRule.of(search, True, ascend=True)
    assert rule.search is search and rule.lr == 0.02
    fixed = StepRule.of(0.03, True, ascend=True)
    assert fixed.search is None and fixed.lr == 0.03


@pytest.mark.parametrize("lr", [1.5, LineSearch(initial=1.5)], ids=["rate", "search"])
def test_a_normalised_step_longer_than_the_weights_is_refused(lr):
    with pytest.raises(
        ValueError, match="lr is relative to the weights' norm when normalize=True: 1.5"
    ):
        StepRule.of(lr, normalize=True, ascend=True)
    assert StepRule.of(lr, normalize=False, ascend=True).lr == 1.5


@pytest.mark.parametrize("lr", [0, -0.1, math.nan, math.inf, True, "0.1"])
def test_a_rate_that_is_not_a_positive_finite_number_is_refused(lr):
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        StepRule.of(lr, normalize=False, ascend=True)


@given(lr=st.floats(1e-4, 1.0), norm=positive, reference=positive, length=st.floats(1 / 64, 16))
def test_a_normalised_step_moves_lr_times_length_times_the_reference(lr, norm, reference, length):
    up = StepRule(lr, normalize=True, ascend=True).scale(norm, reference, length)
    assert abs(up) * norm == pytest.approx(lr * length * reference, rel=1e-12)
    down = StepRule(lr, normalize=True, ascend=False).scale(norm, reference, length)
    assert up > 0 and down == -up


@given(lr=st.floats(1e-4, 10.0), norm=positive, reference=positive, length=st.floats(1 / 64, 16))
def test_a_plain_step_is_lr_times_length_times_the_direction(lr, norm, reference, length):
    up = StepRule(lr, normalize=False, ascend=True).scale(norm, reference, length)
    assert up == pytest.approx(lr * length, rel=1e-12)
    assert StepRule(lr, normalize=False, ascend=False).scale(norm, reference, length) == -up


def test_finite_positive_names_the_value():
    assert finite_positive(3, "cap") == 3.0 and isinstance(finite_positive(3, "cap"), float)
    with pytest.raises(ValueError, match="cap must be a positive finite number, got -3"):
        finite_positive(-3, "cap")


# -- the line search's options and states --------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"initial": 0.0}, "initial must be a positive finite number"),
        ({"initial": math.nan}, "initial must be a positive finite number"),
        ({"growth": -2.0}, "growth must be a positive finite number"),
        ({"shrink": 0.0}, "shrink must be a positive finite number"),
        ({"max_length": math.inf}, "max_length must be a positive finite number"),
        ({"shrink": 1.0}, "a line search needs shrink < 1, growth >= 1 and max_length >= 1"),
        ({"growth": 0.5}, "a line search needs shrink < 1"),
        ({"max_length": 0.5}, "a line search needs shrink < 1"),
        ({"retries": -1}, "retries must be a non-negative whole number, got -1"),
        ({"retries": 1.5}, "retries must be a non-negative whole number, got 1.5"),
        ({"retries": True}, "retries must be a non-negative whole number, got True"),
    ],
)
def test_a_line_search_checks_its_options(options, message):
    with pytest.raises(ValueError, match=message):
        LineSearch(**options)


def test_the_edges_of_a_line_search_are_allowed():
    assert LineSearch(growth=1.0, max_length=1.0, retries=0, shrink=0.999).retries == 0


def test_without_a_policy_the_length_stays_one_and_only_a_landing_is_retried():
    """A fixed rate retries no rejected step, but shortens one that passed the gain limit."""
    state = SearchState(None, may_grow=True, retries=True)
    assert not state.active and state.length == 1.0
    assert state.reject() is False and state.breached(2.0) is False and not state.retrying
    state.accept()
    assert state.length == 1.0
    assert state.land(1.0, 4.0, 2.0, 1.98) and state.retrying and 0 < state.length < 1.0


def test_a_climb_that_cannot_retry_never_retries_nor_grows():
    state = SearchState(LineSearch(growth=2.0), may_grow=True, retries=False)
    assert not state.active
    assert not (state.reject() or state.breached(2.0) or state.land(1.0, 4.0, 2.0, 1.98))
    state.accept()
    assert state.length == 1.0 and not state.retrying


def test_rejections_shorten_the_step_until_the_retries_run_out_and_an_acceptance_resets_them():
    state = SearchState(
        LineSearch(shrink=0.25, retries=2, growth=2.0, max_length=4.0), may_grow=True, retries=True
    )
    assert state.active and not state.retrying
    assert state.reject() and state.retrying and state.length == 0.25
    assert state.reject() and state.length == 0.25**2
    assert state.reject() is False and state.length == 0.25**2
    state.accept()
    assert not state.retrying and state.length == 0.125
    assert state.reject() and state.length == 0.125 * 0.25  # the count starts again


@given(growth=st.floats(1.0, 4.0), max_length=st.floats(1.0, 32.0), accepted=st.integers(1, 12))
def test_acceptances_grow_the_step_up_to_the_longest_only_where_it_may_grow(
    growth, max_length, accepted
):
    policy = LineSearch(growth=growth, max_length=max_length)
    grows = SearchState(policy, may_grow=True, retries=True)
    stays = SearchState(policy, may_grow=False, retries=True)
    for _ in range(accepted):
        grows.accept()
        stays.accept()
    assert grows.length == pytest.approx(min(growth**accepted, max_length), rel=1e-12)
    assert stays.length == 1.0


def test_a_step_shortened_where_it_may_not_grow_grows_back_to_one_at_most():
    state = SearchState(LineSearch(shrink=0.25, growth=8.0), may_grow=False, retries=True)
    state.reject()
    state.accept()
    assert state.length == 1.0


def test_a_breach_binds_the_limit_and_is_retried_while_shortening_helps():
    """A step that broke a limit is retried shorter; from then on the steps grow no more. Tries at
    one point go on while each breach undercuts the last by enough, at most BREACHES in a row; an
    accepted step starts afresh."""
    state = SearchState(LineSearch(growth=2.0, max_length=16.0), may_grow=True, retries=True)
    state.accept()
    state.accept()
    assert state.length == 4.0
    assert state.breached(1.0001) and state.retrying and state.length == 2.0
    state.accept()
    state.accept()
    assert state.length == 2.0 and not state.retrying
    # A limit the shorter step did not relieve (a rounding floor, a guard at its limit) ends the climb.
    assert state.breached(3.0) and state.breached(SHORTENING_HELPS * 3.0 * 1.01) is False
    state.accept()
    # Shortening that keeps helping is tried BREACHES times in a row, no more.
    excesses = [1000.0 * 0.5**k for k in range(BREACHES + 1)]
    assert [state.breached(e) for e in excesses] == [True] * BREACHES + [False]


def test_shortening_is_judged_per_limit():
    """A guard broken after a drift was relieved is that limit's first breach: it is tried again even
    though its excess is larger than the drift's was; a second guard breach that did not fall ends it."""
    state = SearchState(LineSearch(), may_grow=True, retries=True)
    assert state.breached(1.5, "drift") and state.breached(11.0, "guard")
    assert state.breached(SHORTENING_HELPS * 11.0 * 1.01, "guard") is False


def test_a_breach_of_a_step_of_another_length_shortens_that_step():
    """A step the end's check found broken (not the search's last) is retried from its own length."""
    state = SearchState(LineSearch(growth=2.0, max_length=16.0), may_grow=True, retries=True)
    state.accept()
    assert state.length == 2.0
    assert state.breached(2.0, "guard", length=0.5) and state.length == 0.5 * 0.4


def test_a_breach_that_falls_with_the_length_is_tried_until_the_step_fits():
    """An excess with a part proportional to the step's length and a floor below the limit (rounding):
    the linear model undershoots the floor, so one retry does not fit and the second does."""
    state = SearchState(LineSearch(), may_grow=True, retries=True)

    def excess() -> float:
        return 0.5 + 3.0 * state.length

    tries = 0
    while excess() > 1:
        assert state.breached(excess())
        tries += 1
    assert tries == 2 <= BREACHES


@given(excess=st.floats(1.0, 1e12), more=st.floats(1.0, 1e6))
def test_a_larger_breach_retries_a_shorter_step_of_at_most_half_the_length(excess, more):
    def retried(breach: float) -> float:
        state = SearchState(LineSearch(), may_grow=True, retries=True)
        assert state.breached(breach)
        return state.length

    assert 0 < retried(excess * more) <= retried(excess) <= 0.5
    assert retried(math.inf) == retried(1e300) > 0  # a non-finite rise: the shortest retry


@given(start=st.floats(0.1, 10.0), rate=st.floats(0.1, 5.0), gain=st.floats(1.1, 3.0))
def test_a_landing_on_a_log_linear_gradient_norm_hits_the_band_below_the_limit(start, rate, gain):
    """Where the log gradient norm is linear in the step's length, the first secant is exact."""
    ceiling = start * gain
    passed = start * math.exp(rate)  # at length 1
    assume(passed > ceiling * (1 + 1e-9))
    state = SearchState(LineSearch(), may_grow=True, retries=True)
    assert state.land(start, passed, ceiling, ceiling * 0.99)
    landed = start * math.exp(rate * state.length)
    assert ceiling * 0.99 * (1 - 1e-9) <= landed <= ceiling * (1 + 1e-9)


def test_landings_are_tried_at_most_landings_times_and_an_accepted_landing_does_not_grow():
    state = SearchState(LineSearch(growth=2.0), may_grow=True, retries=True)
    lengths = []
    for _ in range(LANDINGS):
        assert state.land(1.0, 10.0, 2.0, 1.98)  # the norm jumps: every try passes the limit
        lengths.append(state.length)
    assert state.land(1.0, 10.0, 2.0, 1.98) is False
    assert all(0 < b < a for a, b in zip([1.0, *lengths], lengths, strict=False))
    state.accept()
    assert state.length == lengths[-1] and not state.retrying


# -- the search in a null-space teleport ---------------------------------------------------------


def mlp(seed: int, widths: tuple[int, ...], dtype=torch.float32) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        return nn.Sequential(*layers[:-1]).to(dtype)


def batch(seed: int, samples: int, width: int, classes: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed + 1000)
    inputs = torch.randn(samples, width, generator=generator, dtype=dtype)
    return inputs, torch.randint(0, classes, (samples,), generator=generator)


def test_without_a_guard_the_search_grows_the_step_only_where_the_sample_saturates_its_core_space():
    # 512 samples on a 3-dimensional subspace of 8 inputs: every core space of the thresholded
    # null space is far smaller than the sample.
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(512, 3, generator=generator) @ torch.randn(3, 8, generator=generator)
    targets = torch.randint(0, 3, (512,), generator=generator)
    # (the drift limit is off: what is checked is what the search tries, not what the limits accept)
    options = {"null_space": "svd", "limits": tt.Limits(drift=None)}
    big = tt.Teleporter(mlp(0, (8, 64, 64, 3)), F.cross_entropy, **options).teleport(
        inputs, targets
    )
    assert max(big.step_sizes) > INITIAL_LR
    # 6 samples in 65 input dimensions span a new direction each: no step beyond the first length.
    small = tt.Teleporter(mlp(0, (64, 64, 64, 3)), F.cross_entropy).teleport(*batch(0, 6, 64, 3))
    assert small.steps > 0 and max(small.step_sizes) <= INITIAL_LR


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_guard_batch_lets_the_search_grow_the_step_where_the_sample_does_not_saturate(dtype):
    """The guard judges every step on data the core space does not keep, so longer steps may be
    tried where the batch alone is no evidence for them (a loose guard: growth, not the guard's
    tolerance, is what is checked)."""
    inputs, targets = batch(3, 6, 64, 3, dtype)
    guard = batch(4, 256, 64, 3, dtype)
    teleporter = tt.Teleporter(
        mlp(3, (64, 64, 64, 3), dtype), F.cross_entropy, limits=tt.Limits(guard=1.0)
    )
    unjudged = tt.Teleporter(mlp(3, (64, 64, 64, 3), dtype), F.cross_entropy).teleport(
        inputs, targets
    )
    assert unjudged.steps == 8 and set(unjudged.step_sizes) == {INITIAL_LR}
    judged = teleporter.teleport(inputs, targets, guard=guard)
    assert judged.steps > 1 and judged.step_sizes[:2] == [INITIAL_LR, 2 * INITIAL_LR]
    assert max(judged.step_sizes) > 2 * INITIAL_LR


def test_a_given_rate_is_kept_for_every_step():
    report = tt.Teleporter(mlp(1, (8, 16, 16, 3)), F.cross_entropy, lr=0.003).teleport(
        *batch(1, 512, 8, 3)
    )
    assert report.steps > 0 and report.step_sizes == [0.003] * report.steps


def test_a_step_the_drift_limit_rejects_is_tried_shorter_and_the_batch_loss_is_kept():
    data = batch(2, 64, 8, 3, torch.float64)
    # tau = 0.99 leaves directions the batch uses: steps of the first length move its loss too far.
    options = {"null_space": "svd", "tau": 0.99, "limits": tt.Limits(drift=4e-5)}
    searched = tt.Teleporter(
        mlp(2, (8, 32, 32, 3), torch.float64), F.cross_entropy, **options
    ).teleport(*data)
    assert searched.steps > 0 and searched.loss_change <= 4e-5
    assert all(size < INITIAL_LR for size in searched.step_sizes)
    fixed = tt.Teleporter(
        mlp(2, (8, 32, 32, 3), torch.float64), F.cross_entropy, lr=INITIAL_LR, **options
    )
    stopped = fixed.teleport(*data)
    assert stopped.stopped == "drift" and stopped.steps < searched.steps
