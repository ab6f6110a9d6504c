"""The demo's live table (rich, on a terminal) or a progress line every few seconds elsewhere.

Shows what the service is doing: episodes, mean return per policy version (an episode counts
for the version that served its first chunk), the live version (newest in a reply), the
robots' p99 round trip, the replay's rows (read with `ReplayReader`, as any process may) and
the operator's acknowledged presses.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from openpi_rl.demo.robots import Fleet, first_version_return, mean_return
from openpi_rl.replay import ReplayReader


class DemoDisplay:
    def __init__(
        self,
        fleet: Fleet,
        replay_dir: Path,
        pendant_url: str,
        seconds: float,
        operator=None,
        log_path: Path | None = None,
        console: Console | None = None,
        versions_shown: int = 8,
    ):
        self.fleet, self.replay_dir, self.operator = fleet, replay_dir, operator
        self.pendant_url, self.seconds, self.log_path = pendant_url, seconds, log_path
        self.console = console or Console(stderr=True)
        self.versions_shown = versions_shown
        self._reader: ReplayReader | None = None
        self._live: Live | None = None
        self._t0 = time.monotonic()
        self._last_line = 0.0
        self._steps0 = (0, self._t0)
        self._rate = 0.0

    def __enter__(self) -> DemoDisplay:
        self._t0 = time.monotonic()
        if self.console.is_terminal:
            self._live = Live(self.render(), console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(*exc)
        if self._reader is not None:
            self._reader.close()

    def replay_rows(self) -> int | None:
        try:
            if self._reader is None:
                self._reader = ReplayReader(self.replay_dir)
            return self._reader.count()
        except Exception:  # not created yet, or busy: shown as unknown
            return None

    def refresh(self) -> None:
        """Call a few times a second: updates the table, or prints a line every 10 s."""
        now = time.monotonic()
        steps, t = self._steps0
        if now - t >= 2.0:
            self._rate = (self.fleet.env_steps - steps) / (now - t)
            self._steps0 = (self.fleet.env_steps, now)
        if self._live is not None:
            self._live.update(self.render())
        elif now - self._last_line >= 10.0:
            self._last_line = now
            print(self.line(), file=sys.stderr, flush=True)

    def stats(self) -> dict:
        eps = self.fleet.snapshot()
        out = {
            "elapsed_s": time.monotonic() - self._t0,
            "episodes": len(eps),
            "env_steps": self.fleet.env_steps,
            "live_version": self.fleet.live_version,
            "p99_ms": self.fleet.p99_ms(),
            "replay_rows": self.replay_rows(),
            "first_version_return": first_version_return(eps),
            "last20_return": mean_return(eps[-20:]),
            "errors": len(self.fleet.errors),
        }
        if self.operator is not None:
            out["operator"] = self.operator.counts()
        return out

    def line(self) -> str:
        s = self.stats()
        op = s.get("operator")
        ops = f" | presses acked {op['acked']} (attached {op['attached']})" if op else ""
        return (
            f"[{s['elapsed_s']:5.0f} s] episodes {s['episodes']:,} | env steps {s['env_steps']:,}"
            f" | live version {s['live_version']} | return: first version"
            f" {_f(s['first_version_return'])}, last 20 {_f(s['last20_return'])}"
            f" | p99 {_f(s['p99_ms'], '{:.1f}')} ms | replay rows {s['replay_rows']}{ops}"
        )

    def render(self) -> Group:
        s = self.stats()
        head = Text.assemble(
            ("openpi-rl demo", "bold"),
            f"  {s['elapsed_s']:.0f} / {self.seconds:.0f} s   pendant: ",
            (self.pendant_url, "bold cyan"),
        )
        fleet = Table(box=None, header_style="bold")
        for col in ("episodes", "env steps", "steps/s", "live version", "p99 ms", "replay rows"):
            fleet.add_column(col, justify="right")
        row = [
            f"{s['episodes']:,}", f"{s['env_steps']:,}", f"{self._rate:,.0f}",
            str(s["live_version"]), _f(s["p99_ms"], "{:.1f}"),
            "–" if s["replay_rows"] is None else f"{s['replay_rows']:,}",
        ]  # fmt: skip
        if "operator" in s:
            op = s["operator"]
            fleet.add_column("presses (ok / fail)", justify="right")
            row.append(f"{op['acked']} ({op['success']} / {op['failure']})")
        fleet.add_column("errors", justify="right")
        row.append(str(s["errors"]))
        fleet.add_row(*row)

        by_version: dict[int, list[float]] = defaultdict(list)
        for e in self.fleet.snapshot():
            by_version[e.version].append(e.ret)
        shown = sorted(by_version)
        shown = shown[:1] + shown[1:][-(self.versions_shown - 1) :]
        versions = Table(title="mean return per policy version", box=None, header_style="bold")
        for col in ("version", "episodes", "mean return"):
            versions.add_column(col, justify="right")
        for v in shown:
            r = by_version[v]
            versions.add_row(str(v), f"{len(r):,}", f"{sum(r) / len(r):.1f}")
        summary = Text(
            f"mean return: first version {_f(s['first_version_return'])}, "
            f"last 20 episodes {_f(s['last20_return'])}"
        )
        parts = [head, fleet, versions, summary]
        if self.log_path is not None:
            parts.append(Text(f"service log: {self.log_path}", style="dim"))
        return Group(*parts)


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)
