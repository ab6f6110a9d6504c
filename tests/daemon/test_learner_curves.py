"""The learner's learning curves: per-update and per-version scalars, read back with
TensorBoard's own reader from a learner trained on a real replay."""

import sys

import numpy as np
import pytest
from learner_helpers import learner_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from openpi_rl.curves import LEARNER_SCALARS, VERSION_SCALARS, CurvesConfig
from openpi_rl.daemon import Learner
from openpi_rl.daemon.learner import learn


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_learner_writes_per_update_and_per_version_curves(tmp_path, recorder):
    rng = np.random.default_rng(0)
    learner = Learner(learner_config(tmp_path, segment_length=4, max_policy_lag=1))
    try:
        # Update 1 trains on version 0's episodes: a (4 chunks x 0.1, fell) and b (6 chunks x
        # 0.2, two segments of this batch, and the operator's success verdict worth 1.0).
        recorder.episode("arm", "a", 4, rng, version=0, reward=0.1)
        b = recorder.episode("arm", "b", 6, rng, version=0, reward=0.2, end="truncated")
        recorder.writer.add_reward_event("arm", "success", 1.0, transition_id=b[-1], wait=True)
        recorder.writer.flush()
        assert learner.step().version == 1
        # Update 2: c (3 chunks x 1.0) served by version 1, d (2 x 0.5) by version 0, a
        # version behind the learner.
        recorder.episode("arm", "c", 3, rng, version=1, reward=1.0)
        recorder.episode("arm", "d", 2, rng, version=0, reward=0.5)
        recorder.writer.flush()
        assert learner.step().version == 2
    finally:
        learner.close()  # writes version 1's tally (still open) and flushes

    curves = _scalars(tmp_path / "ckpt" / "tensorboard")
    missing = sorted({*LEARNER_SCALARS, *VERSION_SCALARS} - set(curves))
    assert not missing, f"not written: {missing}; written: {sorted(curves)}"
    values = lambda tag: [v for _, v in curves[tag]]  # noqa: E731

    assert [s for s, _ in curves["losses/approx_kl"]] == [1, 2]  # x: learn steps
    assert values("charts/version") == [1, 2]
    assert values("charts/episodic_return") == pytest.approx([(0.4 + 2.2) / 2, (3.0 + 1.0) / 2])
    assert values("charts/episodic_length") == [5.0, 2.5]  # chunks
    assert values("charts/success_rate") == [0.5, 0.0]
    assert values("charts/data_age_versions") == pytest.approx([0.0, 2 / 5])  # d's 2 chunks of 5
    assert values("charts/learning_rate") == pytest.approx([1e-3, 1e-3])
    assert all(v > 0 for v in values("time/update_seconds"))
    assert all(np.isfinite(values(tag)).all() for tag in LEARNER_SCALARS)

    # x: the version that served the episodes; version 0's tally (a, b, d) was final once
    # version 2 was out (older than max_policy_lag), version 1's (c) was written at close.
    assert [s for s, _ in curves["version/episodes"]] == [0, 1]
    assert values("version/episodes") == [3, 1]
    assert values("version/episodic_return") == pytest.approx([(0.4 + 2.2 + 1.0) / 3, 3.0])
    assert values("version/episodic_length") == pytest.approx([4.0, 3.0])
    assert values("version/success_rate") == pytest.approx([1 / 3, 0.0])


def test_curves_are_set_in_the_service_file(tmp_path):
    from openpi_rl.service.config import ServiceFile

    path = tmp_path / "openpi-rl.toml"
    path.write_text('checkpoint_dir = "ckpt"\n[learn.curves]\ntensorboard = false\nwandb = true\n')
    curves = ServiceFile.load(path).role_config("learn").curves
    assert (curves.tensorboard, curves.wandb, curves.wandb_mode) == (False, True, "offline")
    path.write_text('[learn.curves]\nwandb_mode = "sometimes"\n')
    with pytest.raises(ValueError, match=r"learn\.curves\.wandb_mode: 'sometimes' is not one of"):
        ServiceFile.load(path).role_config("learn")


def test_learner_with_wandb_on_but_not_installed_exits_ex_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    config = learner_config(tmp_path, curves=CurvesConfig(wandb=True))
    assert learn(config) == 78  # EX_CONFIG: held down, not restarted
    assert "pip install 'openpi-rl[wandb]'" in capsys.readouterr().err
