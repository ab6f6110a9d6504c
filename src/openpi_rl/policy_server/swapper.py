"""Hot-swap (guarantee 3): follow the learner's published versions and replace the live snapshot
between batches, never stalling a request.

    learner PUB {version} + heartbeat -> LatestVersion (single slot, newest only)
      -> swapper thread: check the notice -> verify the content hash -> restore (in the
         restore worker process) -> snapshot.with_leaves
         (device_put; same jitted sampler: no compile) -> one check call (outputs must be
         finite; a LoRA delta: its own arrays must be) -> server.swap

The orbax restore runs in a low-priority worker process (restore_worker.py): in the server's
process its threads held the GIL long enough to show in the robots' p99 (measured there).
`restore_in_worker=False` restores in-process (no second process; e.g. a model too large to
hold twice in RAM). The first version to start from is restored in-process, before warm-up.

Weights never queue: a swapper that falls behind loads only the newest version it has heard
of. The learner's heartbeats (every 0.5 s) show it alive; silent for `peer_timeout_s`, it is
shown dead in `health` and the metrics, and the server keeps serving its last good version.
The learner's side of the exchange asks the server's `health` (weights/notices.py
`ServerWatch`), which also carries `learning_paused`, the admin's pause switch.

Weights come only from our learner: the notice channel is private (an ipc socket in a 0700
directory by default, CURVE across hosts: weights/notices.py); a notice names a version and the
server loads `<checkpoint_dir>/<version>` (a notice naming another path, a version far past the
newest on disk, or a directory that resolves outside `checkpoint_dir` is refused); and a
version goes live only if its files match the manifest the learner wrote (checkpoints.py).
Each refusal is logged and counted (`openpi_rl_server_swap_failures_total{reason}`: path,
version, hash) and the live version serves on.

An operator (admin.py) can pin a version (newer notices are ignored until `unpin`) or roll
back to the newest good version older than the live one (that pins it too; the version rolled
back from is never followed again). These decisions and the pause-learning switch are written
atomically to `<checkpoint_dir>/operator_state.json` and honoured after a restart of the server
or the learner (weights/operator_state.py). Optionally, a new version whose last K episodes' mean
return falls below the previous version's by a margin is rolled back automatically.

A LoRA learner's versions are deltas over a full base version (weights/versions.py). The swapper
knows which full version the live snapshot's frozen arrays came from (`base`): a delta over that
base restores only its own arrays (LoRA + value head) and replaces only those leaves, every
other array of the live snapshot is shared by the new one, not copied. A delta over another (or
an unknown) base restores with its base's arrays, checked against the hash the delta recorded.
A delta over the live base is checked on its own arrays (finite), not by a model call: the
rest of its weights are the live version's, checked when they went live, and the call (a
decode's worth of device time, shared with the robots) was most of a LoRA swap's seconds
(`swap.check_delta_call` brings it back).

`SwapStatus` (swap_status.py: learner liveness, `health` and `status`) is mixed into `Swapper`;
its knobs are `SwapOptions` (options.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import structlog

from openpi_rl.policy_server.options import SwapOptions
from openpi_rl.policy_server.restore_worker import RestoreWorker
from openpi_rl.policy_server.snapshot import PolicySnapshot, all_finite, example_observation
from openpi_rl.policy_server.swap_status import SwapStatus
from openpi_rl.weights.notices import LatestVersion, notice_endpoint
from openpi_rl.weights.operator_state import OperatorState, load_state, save_state
from openpi_rl.weights.versions import (
    CorruptVersion,
    abstract_state,
    restore_leaves,
    verify_base,
    verify_version,
    version_base,
)

if TYPE_CHECKING:
    from openpi_rl.policy_server.server import PolicyServer

log = structlog.get_logger("openpi_rl.policy_server.swapper")


class SwapError(Exception):
    """A version that cannot go live: not on disk, other shapes, non-finite outputs."""


class Swapper(SwapStatus):
    """`Swapper(server, options).start()`; `close()` stops it. Pin, unpin, rollback and status
    are called by the admin endpoint's thread; one lock serialises every load and swap."""

    def __init__(
        self,
        server: PolicyServer,
        options: SwapOptions = SwapOptions(),  # noqa: B008 (SwapOptions is frozen)
    ):
        self.server, self.options = server, options
        self.metrics = server.metrics
        # The served state's shapes and dtypes: the target an in-process restore fills.
        self._target = abstract_state(server.snapshot.state)
        self._worker: RestoreWorker | None = None  # started by start() or the first load
        self.phases: dict[str, float] = {}  # the last swap's phases, seconds (logged)
        # The full version (number, hash) under the live snapshot's frozen arrays; None: not
        # known (the seed's weights), so a delta version restores with its base.
        self.base: tuple[int, str] | None = None
        self.last_restore: dict[str, int | bool] = {}  # arrays, bytes, delta_only (logged)
        self._sub = None
        if options.learner_endpoint and options.checkpoint_dir is not None:
            self._sub = LatestVersion(
                notice_endpoint(options.learner_endpoint, options.checkpoint_dir),
                curve_server_key_file=options.learner_curve_public_key_file,
            )
        elif options.learner_endpoint:
            log.warning("swap.off", reason="no checkpoint_dir: notices cannot be followed")
        self._lock = threading.Lock()
        self.newest: tuple[int, Path] | None = None  # the learner's newest version and its path
        self.previous: int | None = None  # live before the last swap
        self.failed: dict[int, str] = {}  # would not go live: version -> why (not retried)
        self.refused_notices: dict[int, str] = {}  # notices refused: version -> why
        # The operator's decisions, as persisted (a restart honours them).
        op = OperatorState() if self.checkpoint_dir() is None else load_state(self.checkpoint_dir())
        self.pinned: int | None = op.pinned
        self.rejected: set[int] = set(op.rejected)  # rolled back from: never followed again
        self.learning_paused = op.learning_paused
        self._rollback = (op.rollback_target, op.rollback_id)
        self.swaps = 0
        self.last_swap_s: float | None = None
        self._started_t = time.monotonic()
        self._last_swap_t: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swapper", daemon=True)
        server.swapper = self
        m = self.metrics
        m.seconds_since_swap.set_function(self.seconds_since_swap)
        m.versions_behind.set_function(self.versions_behind)
        m.learner_up.set_function(lambda: float(self.learner_alive()))
        m.learner_heartbeat_age.set_function(self.heartbeat_age)
        m.pinned_version.set_function(lambda: -1 if self.pinned is None else self.pinned)
        m.learning_paused.set_function(lambda: float(self.learning_paused))
        self._start_from_disk()

    def _start_from_disk(self) -> None:
        """A (re)started server begins at its pinned version, else the newest version in
        `checkpoint_dir` not rolled back from, not at its seed's weights: loaded before the
        server warms up, so robots never see version 0 of a run that has moved on. A version
        that does not verify or load is skipped (logged)."""
        if self.options.checkpoint_dir is None or self.server.ready:
            return
        on_disk = self.versions_on_disk()
        if self.pinned is not None:
            if self.pinned not in on_disk:
                log.error("swap.pinned_version_missing", pinned=self.pinned, on_disk=on_disk)
            candidates = [self.pinned] if self.pinned in on_disk else []
        else:
            candidates = [v for v in reversed(on_disk) if v not in self.rejected]
        for version in candidates:
            if version == self.server.snapshot.version:
                return
            try:
                path = self._path_of(version)
                digest = verify_version(path, version)
                base = version_base(path) or (version, digest)
                changed = restore_leaves(path, self._target)
                self.server.swap(self.server.snapshot.with_changed(version, changed))
                self.base = base
            except Exception as e:
                log.warning("swap.start_version_unreadable", version=version, error=str(e))
                continue
            log.info("swap.start_version", version=version, pinned=self.pinned)
            return

    # -- lifecycle

    def start(self) -> Swapper:
        """Follow the learner. The restore worker starts here: its imports overlap warm-up."""
        self._restore_worker()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop following the learner. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def died(self) -> bool:
        """True if the swapper's thread ended without `close()` (the server's health fails)."""
        return (
            self._thread.ident is not None
            and not self._thread.is_alive()
            and not self._stop.is_set()
        )

    def _restore_worker(self) -> RestoreWorker | None:
        if self._worker is None and self.options.restore_in_worker and not self._stop.is_set():
            leaves = jax.tree.leaves(self.server.snapshot.state)
            if any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves):
                return None  # key arrays have no numpy form to send: restored in-process
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.server.snapshot.state
            )
            self._worker = RestoreWorker(
                abstract, self.options.nice, self.options.restore_timeout_s
            )
        return self._worker

    def _run(self) -> None:
        if self.options.nice and self._worker is None and hasattr(os, "setpriority"):
            # Linux schedules threads as tasks: a lower priority for this one (and the restore
            # threads it starts) leaves the cores to the serving thread during a swap. Not with
            # a restore worker: what is left here is short and holds the GIL, and a nice'd
            # thread holding it can wait for a core while the serving thread waits for it.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.options.nice)
        while not self._stop.is_set():
            try:
                self._poll()
                self._follow()
                self._check_returns()
            except Exception:  # a bug must not stop hot-swap for good; serving goes on anyway
                log.exception("swapper pass failed")
                self._stop.wait(1.0)

    def _poll(self) -> None:
        if self._sub is None:
            self._stop.wait(0.1)
            return
        before = self._sub.seen
        notice = self._sub.poll(0.1)  # heartbeats are read here too
        if notice is None:
            return
        version = notice["version"]
        why = self._refuse_notice(version, notice["path"])
        if why is None:
            self.newest = (version, self._path_of(version, on_disk=False))
            return
        self._sub.seen = before  # a refused notice must not hide the next good one
        reason, message = why
        if self.refused_notices.get(version) != message:  # heartbeats repeat it: once each
            self.refused_notices[version] = message
            while len(self.refused_notices) > 64:  # bounded: shown in status, not a history
                del self.refused_notices[next(iter(self.refused_notices))]
            self.metrics.swap_failures.labels(reason=reason).inc()
            log.warning(
                "swap.notice_refused", version=version, path=notice["path"], reason=reason,
                error=message,
            )  # fmt: skip

    def _refuse_notice(self, version: int, path: str | None) -> tuple[str, str] | None:
        """(reason, message) when a notice must not be followed; None when it may."""
        d = self.checkpoint_dir()
        try:
            own = self._path_of(version, on_disk=False)
        except SwapError as e:
            return "path", str(e)
        if path is not None and os.path.normpath(os.path.abspath(path)) != str(own):
            return "path", f"names {path!r}: versions load from {d} only"
        on_disk = self.versions_on_disk()
        newest = on_disk[-1] if on_disk else 0
        if version > newest + self.options.max_version_ahead:
            return "version", (
                f"version {version} is more than {self.options.max_version_ahead} past the "
                f"newest on disk ({newest if on_disk else 'none'})"
            )
        return None

    # -- swapping

    def _follow(self) -> None:
        """Swap to the learner's newest version unless pinned, already live, or refused before."""
        if self.newest is None or not self.server.ready:
            return
        version, path = self.newest
        with self._lock:  # checked under the lock: an admin pin may have just landed
            live = self.server.snapshot.version
            if self.pinned is not None or version <= live:
                return
            if version in self.rejected or version in self.failed:
                return
            with contextlib.suppress(SwapError):  # logged and counted; the live version serves on
                self._swap_locked(version, path, "learner")

    def _swap_locked(self, version: int, path: str | Path, reason: str) -> None:
        """Restore, warm up and swap in `version`; the caller holds `_lock`."""
        t0 = time.perf_counter()
        try:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{path}: no such version directory")
            digest = verify_version(path, version)  # the files the learner published, no others
            snapshot, base = self._load(version, path, digest)
        except CorruptVersion as e:
            self._fail(version, path, "hash", e)
        except SwapError as e:
            self._fail(version, path, "nonfinite", e)
        except ValueError as e:  # with_state: a checkpoint of another model config
            self._fail(version, path, "mismatch", e)
        except Exception as e:  # missing, partial or unreadable checkpoint
            self._fail(version, path, "restore", e)
        old = self.server.swap(snapshot)
        self.base = base
        seconds = time.perf_counter() - t0
        self.previous = old.version
        self.swaps += 1
        self.last_swap_s, self._last_swap_t = seconds, time.monotonic()
        self.metrics.swaps.inc()
        self.metrics.swap_seconds.observe(seconds)
        log.info(
            "swap", version=version, previous=old.version, reason=reason,
            seconds=round(seconds, 4), compilations=snapshot.compilations,
            **{f"{k}_s": round(v, 4) for k, v in self.phases.items()},
            **{f"restored_{k}": v for k, v in self.last_restore.items()},
        )  # fmt: skip

    def _load(
        self, version: int, path: str | Path, digest: str
    ) -> tuple[PolicySnapshot, tuple[int, str]]:
        """Restore, place and check `version`: a delta over the live base reads and replaces
        only its own arrays. Returns the snapshot and the base it sits on; the phases' seconds
        go to `phases`."""
        t0 = time.perf_counter()
        base = version_base(path)
        delta_only = base is not None and base == self.base
        if base is not None and not delta_only:
            verify_base(path)  # CorruptVersion (refused as "hash") when missing or changed
        worker = self._restore_worker()
        if worker is not None:
            changed = worker.restore_changed(path, delta_only)
        else:
            changed = restore_leaves(path, self._target, base=not delta_only)
        t1 = time.perf_counter()
        snapshot = self.server.snapshot.with_changed(version, changed)
        self.last_restore = {
            "arrays": len(changed),
            "bytes": sum(int(x.nbytes) for x in changed.values()),
            "delta_only": delta_only,
        }
        t2 = time.perf_counter()
        if delta_only and not self.options.check_delta_call:
            # Only these arrays changed, placed as the live ones they replace (the same
            # executables apply); the rest is the live version's, already checked.
            finite = all_finite(changed.values())
        else:
            # Every padded size was compiled at start-up and versions share the executables:
            # one call checks the weights. Should it have compiled (weights placed
            # differently), every size is compiled here, off the serving path, as at start-up.
            compiled = snapshot.compilations
            finite = snapshot.check(example_observation(self.server.obs_spec))
            if snapshot.compilations != compiled:
                log.warning("swap.compiled", version=version)
                finite = self.server.warm(snapshot) and finite
        t3 = time.perf_counter()
        self.phases = {"restore": t1 - t0, "place": t2 - t1, "check": t3 - t2}
        if not finite:
            raise SwapError(f"version {version}: non-finite weights or outputs at the check")
        return snapshot, (base or (version, digest))

    def _fail(self, version: int, path: str | Path, reason: str, error: Exception) -> None:
        self.failed[version] = f"{reason}: {error}"
        self.metrics.swap_failures.labels(reason=reason).inc()
        log.warning(
            "swap.refused", version=version, path=str(path), reason=reason, error=str(error)
        )
        raise SwapError(f"version {version}: {reason}: {error}") from error

    # -- operator commands (admin.py)

    def checkpoint_dir(self) -> Path | None:
        d = self.options.checkpoint_dir
        return None if d is None else Path(d).absolute()

    def versions_on_disk(self) -> list[int]:
        """Complete versions: orbax renames a version's directory to its number when done."""
        d = self.checkpoint_dir()
        if d is None or not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())

    def _path_of(self, version: int, on_disk: bool = True) -> Path:
        """`<checkpoint_dir>/<version>`, refused (SwapError) when it resolves outside
        `checkpoint_dir` (a symlink) or, with `on_disk`, is not a complete version there."""
        d = self.checkpoint_dir()
        if d is None:
            raise SwapError("no checkpoint directory known: set swap.checkpoint_dir")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise SwapError(f"version: expected an int >= 0, got {version!r}")
        path = d / str(version)
        if path.exists() and not path.resolve().is_relative_to(d.resolve()):
            raise SwapError(f"version {version}: {path} resolves outside {d}")
        if on_disk and version not in self.versions_on_disk():
            raise SwapError(f"version {version}: not in {d} (on disk: {self.versions_on_disk()})")
        return path

    def _persist(self) -> None:
        """Write the operator's decisions (the caller changed one) atomically."""
        d = self.checkpoint_dir()
        if d is None:
            log.warning("operator_state.not_persisted", reason="no checkpoint_dir")
            return
        target, rollback_id = self._rollback
        save_state(
            d,
            OperatorState(
                pinned=self.pinned,
                rejected=tuple(sorted(self.rejected)),
                learning_paused=self.learning_paused,
                rollback_target=target,
                rollback_id=rollback_id,
            ),
        )

    def set_learning_paused(self, paused: bool) -> None:
        """The operator's pause switch, read by the learner from `health` and from disk."""
        with self._lock:
            self.learning_paused = bool(paused)
            self._persist()

    def pin(self, version: int) -> None:
        """Serve `version` (loading it if it is not live) and ignore newer notices until unpin."""
        path = None if version == self.server.snapshot.version else self._path_of(version)
        with self._lock:
            if path is not None and version != self.server.snapshot.version:
                self.failed.pop(version, None)  # an explicit request tries again
                self._swap_locked(version, path, "pin")
            self.pinned = version
            self._persist()
        log.info("pinned", version=version)

    def unpin(self) -> None:
        """Follow the learner again (its newest version goes live on the next pass)."""
        with self._lock:
            self.pinned = None
            self._persist()
        log.info("unpinned")

    def rollback(self, trigger: str = "admin", target: int | None = None) -> int:
        """Go back to `target` (default: the newest good version older than the live one),
        pin it, and never follow the live version again. Returns the version now live."""
        live = self.server.snapshot.version
        if target is None:
            good = [
                v
                for v in self.versions_on_disk()
                if v < live and v not in self.rejected and v not in self.failed
            ]
            if not good:
                raise SwapError(f"no good version older than {live} on disk")
            target = good[-1]
        path = self._path_of(target)
        with self._lock:
            self._swap_locked(target, path, f"rollback:{trigger}")
            self.rejected.add(live)
            self.pinned = target
            self._rollback = (target, self._rollback[1] + 1)  # the learner trains on from it
            self._persist()
        self.metrics.rollbacks.labels(trigger=trigger).inc()
        log.warning("rollback", trigger=trigger, version=target, rejected=live)
        return target

    def _check_returns(self) -> None:
        """Automatic rollback: the live version's last K episodes against the previous one's."""
        k, margin = self.options.auto_rollback_episodes, self.options.auto_rollback_margin
        if k <= 0 or self.pinned is not None or self.previous is None:
            return
        live = self.server.snapshot.version
        now = self.server.returns.last(live, k)
        before = self.server.returns.last(self.previous, k)
        if len(now) < k or len(before) < k:
            return
        mean_now, mean_before = sum(now) / k, sum(before) / k
        if mean_now < mean_before - margin:
            log.warning(
                "auto_rollback", version=live, mean_return=mean_now,
                previous=self.previous, previous_mean_return=mean_before, margin=margin,
            )  # fmt: skip
            try:
                self.rollback("auto", self.previous)
            except SwapError:
                with self._lock:  # stop following; an operator decides
                    self.pinned = self.server.snapshot.version
                    self._persist()


__all__ = ["SwapError", "SwapOptions", "Swapper"]
