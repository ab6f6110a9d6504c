"""The Learner as a process: `run` (process 0), `follow` (the others), `close` and release.

Mixed into `Learner` (as warmup.py's `CriticWarmup` is): what a service process does around
its work (sd_notify READY/WATCHDOG, the threads beside it, a stop from a signal handler, a
lost peer) kept apart from what one update does (learner.py). Several learner processes
(`[learn.distributed]`, distributed.py) are one learner: process 0 polls and sends each turn,
the others play the turns it sends them (lockstep.py) until it stops.
"""

from __future__ import annotations

import threading

import jax
import structlog

from openpi_rl.daemon.lockstep import Turn
from openpi_rl.replay import store
from openpi_rl.sdnotify import Notifier

log = structlog.get_logger("openpi_rl.learner")


class LearnerProcess:
    """`run`, `follow`, `close` (mixed into `Learner`: its step, turns, operator checks,
    publisher, servers, checkpoints and replay source)."""

    def run(self) -> int:
        """Poll and update until `close()` or `max_updates` published updates; then release
        (what `close()` does) on its way out. A process other than 0 follows process 0's turns
        (`follow`) until it stops."""
        c = self.config
        if not self.primary:
            return self.follow()
        if self._closing:
            self._release()
            return 0
        self._run_thread = threading.get_ident()
        self._run_ended.clear()
        log.info(
            "learner.start", version=self.version, endpoint=self.publisher.endpoint,
            replay_dir=store.describe(c.replay_dir), devices=self.dp.size,
        )  # fmt: skip
        self.publisher.set_state("waiting")
        done = 0
        # READY=1: version 0 is saved or the newest version restored. WATCHDOG=1 between steps
        # only, so a stuck update silences it; the watchdog limit must cover one update.
        notifier = Notifier()
        notifier.ready(status=f"version {self.version}")
        failed = None
        try:
            while not self._closing:
                failed = self._dead_stage()
                if failed is not None:
                    log.error("learner.stage_failed", stage=failed, version=self.version)
                    self.publisher.set_state("failed")
                    break
                notifier.watchdog()
                if c.max_updates is not None and done >= c.max_updates:
                    break
                self.check_operator()
                if self._paused():
                    self.lockstep.send(Turn())  # the other processes wait for the next turn
                    self._wake.wait(0.1)
                    continue
                result = self.step()
                if result is None:
                    self._wake.wait(min(c.poll_interval_s, 0.25))
                elif result.published:
                    done += 1
        except jax.errors.JaxRuntimeError:
            # A collective failed (the stop turn would too, or hang): another process is gone.
            self._group_lost = self.lockstep.processes > 1
            raise
        finally:
            self._release()
            self._run_thread = None
            self._run_ended.set()
        return 0 if failed is None else 1  # non-zero: the supervisor restarts the learner

    def follow(self) -> int:
        """A process other than 0: play process 0's turns until it stops (a `close()` here
        waits for that: every update and save needs every process)."""
        self._run_thread = threading.get_ident()
        self._run_ended.clear()
        log.info(
            "learner.following", process=jax.process_index(), processes=jax.process_count(),
            version=self.version, devices=self.dp.size, local_devices=self.dp.local_size,
        )  # fmt: skip
        # READY=1 once joined and resumed; WATCHDOG=1 per turn (process 0 sends one at least
        # every poll interval, and one per update: the watchdog limit must cover an update).
        notifier = Notifier()
        notifier.ready(status=f"following process 0, version {self.version}")
        try:
            while not (turn := self.lockstep.receive()).stop:
                notifier.watchdog()
                self._play(turn)
        except jax.errors.JaxRuntimeError:
            self._group_lost = True  # a collective failed: process 0 is gone (`learn` exits)
            raise
        finally:
            self._release()
            self._run_thread = None
            self._run_ended.set()
        return 0

    def _dead_stage(self) -> str | None:
        """The learner's threads beside `run`: the heartbeat (servers follow it) and the
        server watches (pauses come through them). One that died ends `run` with 1."""
        if self.publisher.died():
            return "heartbeat"
        if self.servers.died():
            return "server watch"
        return None

    def close(self) -> None:
        """Stop `run` after the current step, finish pending checkpoint writes, close sockets
        and the replay. Idempotent, from any thread: while `run` runs on another thread, it
        returns once `run` has released everything. On `run`'s own thread (a signal handler)
        it only sets a flag and takes no lock: `run` returns after the current step and
        releases on its way out (a lock taken there could be the one the interrupted `run`
        holds: a learner that never stops, killed at the timeout)."""
        self._closing = True
        running = self._run_thread
        if running is not None:
            if running != threading.get_ident():
                self._wake.set()
                self._run_ended.wait()
            return
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A lost group: no stop turn, and no wait for a save that needs the dead process (each
        # would fail or hang till the heartbeat timeout); what it left is skipped on resume.
        lost = self._group_lost
        if not self.primary:
            if not lost:
                self.checkpoints.close()
                self.warmup.close()
            return
        if not lost:
            self.lockstep.send(Turn(stop=True))  # the other processes return from `follow`
        self.publisher.set_state("failed" if lost else "stopping")
        self.servers.close()
        if not lost:
            self.checkpoints.close()
            self.warmup.close()
        self.publisher.close()
        if self._source is not None:
            self._source.close()
        self.curves.close()
        log.info("learner.stopped", version=self.version, **self.counters)


__all__ = ["LearnerProcess"]
