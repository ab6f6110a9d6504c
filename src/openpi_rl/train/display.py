"""Progress for `openpi-rl train`: a live rich table on a terminal, structlog lines elsewhere."""

from __future__ import annotations

from collections import deque
from typing import Any

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

log = structlog.get_logger("openpi_rl.train")

# (row key, column title, format)
COLUMNS = (
    ("update", "update", "{:d}"),
    ("env_steps", "env steps", "{:,d}"),
    ("return", "return (last 20)", "{:.1f}"),
    ("steps_per_s", "steps/s", "{:,.0f}"),
    ("policy_loss", "policy loss", "{:+.4f}"),
    ("value_loss", "value loss", "{:.3g}"),
    ("entropy", "entropy", "{:.3f}"),
    ("approx_kl", "approx KL", "{:.4f}"),
    ("clip_fraction", "clip frac", "{:.3f}"),
    ("explained_variance", "expl. var", "{:.3f}"),
)


class TrainDisplay:
    def __init__(
        self, total_updates: int, start: int = 0, rows: int = 12, console: Console | None = None
    ):
        self.console = console or Console(stderr=True)
        self.live_mode = self.console.is_terminal
        self.rows: deque[dict[str, Any]] = deque(maxlen=rows)
        self.progress = Progress(
            TextColumn("[bold]PPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("updates"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=total_updates, completed=start)
        self.live = (
            Live(self._render(), console=self.console, refresh_per_second=4)
            if self.live_mode
            else None
        )

    def _render(self) -> Group:
        table = Table(expand=False, header_style="bold cyan")
        for _, title, _ in COLUMNS:
            table.add_column(title, justify="right")
        for row in self.rows:
            table.add_row(*(_fmt(fmt, row.get(key)) for key, _, fmt in COLUMNS))
        return Group(table, self.progress)

    def __enter__(self) -> TrainDisplay:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.progress.update(self.task, completed=row["update"])
        if self.live is not None:
            self.live.update(self._render())
        else:
            log.info("update", **{k: _plain(row.get(k)) for k, _, _ in COLUMNS})


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _plain(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value
