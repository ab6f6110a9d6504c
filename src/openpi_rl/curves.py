"""Learning curves: scalars for TensorBoard and, optionally, Weights & Biases.

The learner (daemon/) and `openpi-rl train` (train/) both write through one `CurveLogger`,
with CleanRL's names where CleanRL has one (`charts/episodic_return`, `losses/approx_kl`, ...;
the full list is `LEARNER_SCALARS`, `TRAIN_SCALARS` and `VERSION_SCALARS` below and README's
"Learning curves"). Prometheus stays for operations (is it up, is it keeping up); these are for
the researcher (is it learning).

    <run dir>/tensorboard/events.out.tfevents.*   tensorboardX's writer (no TensorFlow, no torch);
                                                   `tensorboard --logdir <run dir>`
    <run dir>/wandb/offline-run-*/                 with `wandb = true`; `wandb sync` uploads it

tensorboardX queues events and a background thread writes them, so a scalar costs the caller
microseconds. wandb is an optional extra (`pip install 'openpi-rl[wandb]'`), imported only when
enabled; its default mode here is offline (no network, no login).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import structlog

log = structlog.get_logger("openpi_rl.curves")

# Per-update scalars, x axis `global_step` (env steps for train, learn steps for the learner).
CHARTS = (
    "charts/episodic_return",  # mean return of the episodes that ended in this update's data
    "charts/episodic_length",  # their mean length (env steps for train, chunks for the learner)
    "charts/success_rate",  # the fraction of them that succeeded
    "charts/learning_rate",
    "charts/data_age_versions",  # mean (version trained on - version that served a chunk)
)
LOSSES = (
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "losses/grad_norm",
    "losses/loss",
)
TIME = ("time/update_seconds",)  # wall time of one update
LEARNER_SCALARS = (*CHARTS, *LOSSES, *TIME, "losses/update_kl", "charts/version")
TRAIN_SCALARS = (*CHARTS, *LOSSES, *TIME, "charts/SPS")
# Per-version scalars, x axis the policy version that played the episodes.
VERSION_SCALARS = (
    "version/episodic_return",
    "version/episodic_length",
    "version/success_rate",
    "version/episodes",
)
# PPO's metric names (rl/ppo.py) -> curve names (CleanRL's).
PPO_NAMES = {
    "policy_loss": "losses/policy_loss",
    "value_loss": "losses/value_loss",
    "entropy": "losses/entropy",
    "approx_kl": "losses/approx_kl",
    "clip_fraction": "losses/clipfrac",
    "explained_variance": "losses/explained_variance",
    "grad_norm": "losses/grad_norm",
    "loss": "losses/loss",
    "bc_loss": "losses/bc_loss",
}


class CurvesConfigError(ValueError):
    """Curves are configured in a way that cannot run (W&B on, wandb not installed)."""


@dataclasses.dataclass(frozen=True)
class CurvesConfig:
    """Where learning curves go (`[learn.curves]` in the service file, `--curves.*` flags)."""

    tensorboard: bool = True  # TensorBoard event files in <dir>/tensorboard
    dir: str | None = None
    """The run's directory. None: the checkpoint directory (learn; train with a checkpoint
    directory), else runs/<env>__<seed>__<unix time> (train, as CleanRL)."""
    wandb: bool = False  # also log to Weights & Biases (the `wandb` extra), in <dir>/wandb
    wandb_project: str = "openpi-rl"  # the W&B project the run belongs to
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: nothing leaves the machine (`wandb sync <dir>/wandb/offline-run-*` uploads it
    later); online needs `wandb login`."""
    flush_s: float = 10.0  # TensorBoard's files are flushed at least this often


class CurveLogger:
    """`scalars(step, values)` to every enabled backend; `close()` flushes (idempotent).

    run_config: the run's settings (W&B's run config; secrets already masked)."""

    def __init__(
        self,
        config: CurvesConfig,
        run_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        name: str | None = None,
    ):
        self.config = config
        self.run_dir = Path(config.dir if config.dir is not None else run_dir)
        self._tb = None
        self._wandb = None
        self._axes: dict[str, str] = {}  # W&B: metric group -> its x axis
        if config.wandb:
            self._wandb = _wandb_run(config, self.run_dir, run_config, name)
        if config.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.tensorboard_dir), flush_secs=config.flush_s)
        if self.enabled:
            log.info(
                "curves.writing", tensorboard=str(self.tensorboard_dir) if self._tb else None,
                wandb=str(self._wandb.dir) if self._wandb else None,
            )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self._tb is not None or self._wandb is not None

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run's directory (`<dir>/wandb/offline-run-*`), None when W&B is off."""
        return None if self._wandb is None else Path(self._wandb.dir).parent

    def scalars(self, step: int, values: Mapping[str, float], axis: str = "global_step") -> None:
        """Write `values` ({name: number}) at x = step. None and non-numbers are skipped.
        axis: the x axis's name for W&B (TensorBoard gives each tag its own steps); keep
        one axis per name group (`charts/`, `version/`)."""
        clean = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        if not clean:
            return
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            for group in {k.split("/")[0] for k in clean}:
                if group not in self._axes:  # W&B plots the group against `axis`, not _step
                    self._axes[group] = axis
                    self._wandb.define_metric(axis, hidden=True)
                    self._wandb.define_metric(f"{group}/*", step_metric=axis)
            self._wandb.log({axis: step, **clean})

    def __enter__(self) -> CurveLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            log.info("curves.wandb_offline", sync=f"wandb sync {self.wandb_dir}")
            self._wandb = None


def _wandb_run(
    config: CurvesConfig, run_dir: Path, run_config: Mapping[str, Any] | None, name: str | None
) -> Any:
    try:
        import wandb
    except ImportError:
        raise CurvesConfigError(
            "curves.wandb: W&B logging is on but the wandb package is not installed "
            "(pip install 'openpi-rl[wandb]')"
        ) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    # console="off": W&B does not wrap this process's stdout/stderr (the service's log).
    settings = wandb.Settings(console="off", silent=True)
    return wandb.init(
        project=config.wandb_project, dir=str(run_dir), mode=config.wandb_mode,
        name=name or run_dir.name, config=_plain(run_config or {}), settings=settings,
    )  # fmt: skip


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (W&B's config is JSON): anything else becomes its str()."""
    return json.loads(json.dumps(dict(config), default=str))


def config_dict(config: Any) -> dict[str, Any]:
    """A role's config as W&B's run config: a dict, secrets masked."""
    from openpi_rl.secret import masked

    return _plain(dataclasses.asdict(masked(config)))


def mean(values: list[float]) -> float | None:
    """Mean of a list; None when it is empty (nothing to plot this time)."""
    return math.fsum(values) / len(values) if values else None
