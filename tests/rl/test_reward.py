"""The reward provider contract (validation, clamping, subclassing) and the programmatic
providers: ExternalReward (a function, or one imported from a module written to tmp_path) and
CompositeReward. The human-feedback providers are in test_reward_human.py."""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest

from openpi_rl.rl.reward import (
    CompositeReward,
    ExternalReward,
    RewardConfig,
    RewardError,
    RewardProvider,
)


def _step(seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    observation = {"state": rng.standard_normal(4).astype(np.float32), "prompt": "pick"}
    actions = rng.uniform(-0.1, 0.1, size=(2, 3)).astype(np.float32)
    return observation, actions


def _const(value: object) -> ExternalReward:
    return ExternalReward(lambda observation, actions: value)


# --------------------------------------------------------------------------------------------
# Validation and clamping


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", None, np.array([0.1, 0.2])])
def test_non_finite_or_non_number_reward_raises_naming_provider_and_value(bad):
    def my_fn(observation, actions):
        return bad

    with pytest.raises(RewardError, match=r"ExternalReward\(.*my_fn\)") as info:
        ExternalReward(my_fn).get(*_step())
    assert isinstance(info.value, ValueError)
    assert str(bad if not isinstance(bad, np.ndarray) else "shape [2]") in str(info.value)


@pytest.mark.parametrize(
    ("value", "config", "expected"),
    [
        (3.0, RewardConfig(), 1.0),
        (-7, RewardConfig(), -1.0),
        (np.float32(0.25), RewardConfig(), 0.25),
        (np.array([[0.5]]), RewardConfig(), 0.5),
        (True, RewardConfig(), 1.0),
        (12.0, RewardConfig(min_reward=0.0, max_reward=10.0), 10.0),
    ],
)
def test_reward_is_a_python_float_clamped_to_config(value, config, expected):
    reward = ExternalReward(lambda o, a: value, config=config).get(*_step())
    assert type(reward) is float
    assert reward == expected


def test_reward_config_rejects_inverted_or_infinite_range():
    with pytest.raises(ValueError, match="min_reward <= max_reward"):
        RewardConfig(min_reward=1.0, max_reward=0.0)
    with pytest.raises(ValueError, match="finite"):
        RewardConfig(max_reward=math.inf)


def test_subclass_in_design_doc_style_overrides_get():
    class MyCustomReward(RewardProvider):
        def get(self, observation, actions):
            return 0.0

    with MyCustomReward() as provider:
        assert provider.get(*_step()) == 0.0


def test_subclass_implementing_get_raw_is_validated_and_clamped():
    class Doubler(RewardProvider):
        def _get(self, observation, actions):
            return 2 * float(observation["x"])

    provider = Doubler(RewardConfig(min_reward=0.0, max_reward=5.0))
    assert provider.get({"x": 1.5}, np.zeros((1, 1))) == 3.0
    assert provider.get({"x": 100}, np.zeros((1, 1))) == 5.0
    with pytest.raises(RewardError, match="Doubler: expected a finite number, got nan"):
        provider.get({"x": math.nan}, np.zeros((1, 1)))


def test_subclass_implementing_nothing_cannot_be_built():
    class Empty(RewardProvider):
        pass

    with pytest.raises(TypeError, match="_get"):
        Empty()


# --------------------------------------------------------------------------------------------
# ExternalReward


def test_external_reward_calls_function_with_observation_and_actions():
    def penalize_large_actions(observation, actions):
        return -0.1 * float(np.linalg.norm(actions)) + observation["bonus"]

    actions = np.full((2, 2), 0.5)
    reward = ExternalReward(penalize_large_actions).get({"bonus": 0.3}, actions)
    assert reward == pytest.approx(-0.1 * 1.0 + 0.3)


@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> Iterator[str]:
    name = "openpi_rl_test_rewards_mod"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            NOT_CALLABLE = 3

            def action_sum(observation, actions):
                return float(np.sum(actions)) + observation.get("offset", 0.0)

            class Scorers:
                @staticmethod
                def negative(observation, actions):
                    return -0.5
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_external_reward_imports_function_from_string(reward_module):
    actions = np.full((2, 3), 0.1)
    assert ExternalReward(f"{reward_module}:action_sum").get({}, actions) == pytest.approx(0.6)
    assert ExternalReward(f"{reward_module}.action_sum").get(
        {"offset": 0.1}, actions
    ) == pytest.approx(0.7)
    assert ExternalReward(f"{reward_module}:Scorers.negative").get({}, actions) == -0.5


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "int is not callable"),
        ("justaname", 'expected "module:function"'),
    ],
)
def test_external_reward_bad_string_names_it(reward_module, path, match):
    path = path.format(mod=reward_module)
    with pytest.raises(RewardError, match=match) as info:
        ExternalReward(path)
    assert repr(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# CompositeReward


def test_composite_is_weighted_sum_of_clamped_parts():
    composite = CompositeReward(
        [(_const(0.5), 2.0), (_const(-0.25), 1.0), (_const(4.0), 0.5)],  # 4.0 clamps to 1.0
        config=RewardConfig(min_reward=-5.0, max_reward=5.0),
    )
    assert composite.get(*_step()) == pytest.approx(2 * 0.5 - 0.25 + 0.5 * 1.0)


def test_composite_clamps_sum_to_own_range():
    composite = CompositeReward([(_const(1.0), 1.0), (_const(1.0), 1.0)])
    assert composite.get(*_step()) == 1.0


def test_composite_names_a_bad_part_that_skips_validation():
    class Broken(RewardProvider):
        def get(self, observation, actions):
            return math.nan

    with pytest.raises(RewardError, match="Broken: expected a finite number, got nan"):
        CompositeReward([(_const(0.0), 1.0), (Broken(), 1.0)]).get(*_step())


@pytest.mark.parametrize(
    ("parts", "error", "match"),
    [
        ([], ValueError, "at least one"),
        ([(None, 1.0)], TypeError, "expected a RewardProvider"),
        ("weight_nan", ValueError, "must be finite"),
        ("weight_str", ValueError, "must be a number"),
    ],
)
def test_composite_rejects_bad_parts(parts, error, match):
    if parts == "weight_nan":
        parts = [(_const(0.0), math.nan)]
    elif parts == "weight_str":
        parts = [(_const(0.0), "1")]
    with pytest.raises(error, match=match):
        CompositeReward(parts)


def test_composite_close_closes_parts():
    closed = []

    class Closing(RewardProvider):
        def _get(self, observation, actions):
            return 0.0

        def close(self):
            closed.append(self)

    parts = [Closing(), Closing()]
    with CompositeReward([(p, 1.0) for p in parts]):
        pass
    assert closed == parts
