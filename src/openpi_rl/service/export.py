"""`openpi-rl export-openpi OUT --config openpi-rl.toml [--version N]`: a version the learner
published, as an openpi checkpoint again.

The policy improved on the robot goes back where it came from: `OUT/params` in the layout of
openpi's trainer (what openpi's `restore_params` and its policy server load, and what a
service's `[model] checkpoint` starts from), and the norm stats the service used in
`OUT/assets/[ASSET_ID/]norm_stats.json`. A LoRA version is written with its adapters (openpi's `_lora` variant
layout); the value head stays behind (openpi has none).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import tyro


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    out: Annotated[Path, tyro.conf.Positional]
    """Directory to write (must not exist): OUT/params and OUT/assets/norm_stats.json."""
    config: Path = Path("openpi-rl.toml")
    """The service file of the run: its [model] and its checkpoint_dir."""
    version: int | None = None
    """The version to export; None: the newest."""
    asset_id: str | None = None
    """Write the norm stats to OUT/assets/ASSET_ID/ (where openpi's policy loader looks: your
    openpi config's asset_id, e.g. physical-intelligence/libero); None: OUT/assets/."""


def export_openpi(
    config: Path, out: Path, version: int | None = None, asset_id: str | None = None
) -> tuple[int, Path]:
    """Write version `version` (None: the newest) of `config`'s run to `out` as an openpi
    checkpoint. Returns (the version, its params directory). Raises ValueError naming what is
    wrong (no versions, a model without openpi's layout, `out` existing)."""
    from flax import nnx

    from openpi_rl.service.config import ServiceFile
    from openpi_rl.weights.start import build_start
    from openpi_rl.weights.versions import VersionCheckpoints, restore_version

    learn = ServiceFile.load(config).role_config("learn")
    model = learn.model
    if not hasattr(model, "checkpoint"):
        raise ValueError(f"[model] kind {model.KIND!r}: only pi0_fast_openpi has openpi's layout")
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new directory")
    if not Path(learn.checkpoint_dir).is_dir():
        raise ValueError(f"checkpoint_dir {learn.checkpoint_dir}: no such directory")
    checkpoints = VersionCheckpoints(learn.checkpoint_dir, None)
    try:
        version = checkpoints.latest_version() if version is None else version
        if version is None or version not in checkpoints.versions():
            raise ValueError(
                f"{learn.checkpoint_dir}: no version {version if version is not None else ''}"
                f" (versions: {checkpoints.versions()})"
            )
        path = checkpoints.path(version)
        checkpoints.verify(version)
    finally:
        checkpoints.close()
    ac = build_start(model, learn.value_hidden, learn.seed)
    nnx.update(ac, restore_version(path, ac))
    params = ac.model.save_openpi(out)
    if model.norm_stats is not None:
        stats = Path(model.norm_stats)
        stats = stats / "norm_stats.json" if stats.is_dir() else stats
        assets = out / "assets" / (asset_id or "")
        assets.mkdir(parents=True, exist_ok=True)
        shutil.copy(stats, assets / "norm_stats.json")
    return version, params


def export_main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(ExportArgs, args=argv, prog="openpi-rl export-openpi")
    try:
        version, params = export_openpi(args.config, args.out, args.version, args.asset_id)
    except (ValueError, FileNotFoundError) as e:
        print(f"openpi-rl export-openpi: {e}", file=sys.stderr)
        return 2
    print(f"version {version} -> {params} (openpi's checkpoint layout)")
    return 0
