"""`openpi-rl train`'s learning curves, read back with TensorBoard's own reader; W&B offline."""

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from openpi_rl.cli import main
from openpi_rl.curves import TRAIN_SCALARS, VERSION_SCALARS, CurveLogger, CurvesConfig

UPDATES, ENVS, STEPS = 2, 2, 16


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_short_train_run_writes_every_named_curve_to_tensorboard_and_wandb(tmp_path):
    run = tmp_path / "run"
    code = main(
        [
            "train", "--num_envs", str(ENVS), "--rollout_length", str(STEPS),
            "--num_train_steps", str(UPDATES), "--ppo.lr", "0.001",
            "--curves.dir", str(run), "--curves.wandb",
        ]
    )  # fmt: skip
    assert code == 0
    curves = _scalars(run / "tensorboard")
    missing = sorted({*TRAIN_SCALARS, *VERSION_SCALARS} - set(curves))
    assert not missing, f"not written: {missing}; written: {sorted(curves)}"

    # Per update, x = env steps (one action per chunk: a transition is one env step).
    env_steps = [ENVS * STEPS * (u + 1) for u in range(UPDATES)]
    assert [s for s, _ in curves["losses/approx_kl"]] == env_steps
    assert [v for _, v in curves["charts/learning_rate"]] == pytest.approx([0.001] * UPDATES)
    assert all(v == 0.0 for _, v in curves["charts/data_age_versions"])  # on-policy
    # InvertedPendulum-v5 pays 1 per step but 0 for the step the pole falls on (a failure):
    # mean return = mean length - the fraction that failed.
    for (s1, ret), (s2, length), (s3, success) in zip(
        curves["charts/episodic_return"], curves["charts/episodic_length"],
        curves["charts/success_rate"], strict=True,
    ):  # fmt: skip
        assert s1 == s2 == s3 and length >= 1
        assert ret == pytest.approx(length - (1.0 - success))
    # Per version, x = the policy version (updates before the rollout) that played them.
    assert [s for s, _ in curves["version/episodes"]] == list(range(UPDATES))
    assert all(n >= 1 for _, n in curves["version/episodes"])
    assert all(0.0 <= v <= 1.0 for _, v in curves["version/success_rate"])

    # W&B, offline: a run directory `wandb sync` can upload, holding the same curve names.
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run / "wandb").iterdir())
    records = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
    assert b"charts/episodic_return" in records and b"version/episodic_return" in records


def test_wandb_enabled_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError, match=r"curves.wandb: .*pip install 'openpi-rl\[wandb\]'"):
        CurveLogger(CurvesConfig(wandb=True), tmp_path)
