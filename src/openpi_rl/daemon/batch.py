"""Segments -> a fixed-shape, time-major training batch, and GAE over action chunks; which
segments can share a batch (`usable_segments`).

Every segment is one column of a [T, S] layout (T = segment_length, S = segments per update),
padded at the end; fixed shapes mean the learn step compiles once. GAE runs over chunks, as
πRL does with pi0: gamma and lambda apply per chunk, not per control step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import structlog

from openpi_rl.daemon.replay_source import ReplaySource, Segment
from openpi_rl.replay import CorruptRecord, MissingRecord, TransitionRow
from openpi_rl.rl.ppo import gae_advantages
from openpi_rl.rl.rl_api import Array, ObsSpec

log = structlog.get_logger("openpi_rl.learner")  # the learner's events, as before the move


class ChunkBatch(NamedTuple):
    """Time-major batch: T chunk steps x S segments. Column s is segment s, padded at its end."""

    obs: dict[str, np.ndarray]  # [T, S, ...] the observation each chunk was served for
    boot_obs: dict[str, np.ndarray]  # [S, ...] observation whose value closes column s
    policy_actions: np.ndarray  # [T, S, ...] what the ratio is computed on (tokens or actions)
    logp: np.ndarray  # [T, S] behaviour log-prob stored at serving time
    rewards: np.ndarray  # [T, S] env reports + operator events
    dones: np.ndarray  # [T, S] terminal: no bootstrap
    ends: np.ndarray  # [T, S] time-limit end: bootstrap from the next step's observation
    valid: np.ndarray  # [T, S] a real step (not padding)
    intervened: np.ndarray  # [T, S] an operator took over: out of the PPO ratio
    bc_actions: np.ndarray  # [T, S, H, D] actions the operator executed
    bc_mask: np.ndarray  # [T, S] bc_actions holds an executed chunk to clone
    versions: np.ndarray  # [T, S] policy version that served the chunk (-1: padding)


def chunk_gae(
    rewards: Array,
    values: Array,
    boot_values: Array,
    dones: Array,
    ends: Array,
    valid: Array,
    gamma: float,
    lam: float,
) -> tuple[Array, Array]:
    """GAE over padded segments. Returns (advantages [T, S], returns [T, S]); 0 on padding.

    rewards, values, dones, ends, valid: [T, S], time first; column s is one segment whose valid
    steps come first. values[t, s] = V(obs of step t). boot_values: [S], the value that follows
    the segment's last valid step (its successor's observation after a cut; its own observation
    after a time-limit end; ignored when that step is terminal). A step with `ends` set stops the
    recursion and bootstraps from values[t + 1] (the next observation); a `dones` step stops it
    with no bootstrap.
    """
    valid = jnp.asarray(valid, bool)
    boot_values = jnp.asarray(boot_values, jnp.float32)
    values = jnp.where(valid, jnp.asarray(values, jnp.float32), 0.0)
    next_valid = jnp.concatenate([valid[1:], jnp.zeros_like(valid[:1])], 0)
    last = valid & ~next_valid
    next_values = jnp.concatenate([values[1:], boot_values[None]], 0)
    next_values = jnp.where(last, boot_values[None], next_values)
    dones = jnp.asarray(dones, bool) | ~valid  # padding: zero reward, zero value, no bootstrap
    truncated = (jnp.asarray(ends, bool) | last) & ~dones
    rewards = jnp.where(valid, jnp.asarray(rewards, jnp.float32), 0.0)
    return gae_advantages(
        rewards, values, dones, truncated, jnp.zeros_like(boot_values), gamma, lam, next_values
    )


def build_batch(
    segments: Sequence[Segment],
    observation: Callable[[TransitionRow], Mapping[str, np.ndarray]],
    obs_spec: ObsSpec,
    action_shape: tuple[int, int],
    segment_length: int,
    num_segments: int,
) -> ChunkBatch:
    """Pack up to `num_segments` segments (each at most `segment_length` steps) into a
    ChunkBatch. observation(row) decodes a transition's observation. Observation keys are those
    of the first step; a segment whose steps differ in keys raises ValueError (the caller
    filters with `obs_keys`).
    """
    if len(segments) > num_segments:
        raise ValueError(f"segments: expected at most {num_segments}, got {len(segments)}")
    if not segments:
        raise ValueError("segments: expected at least one")
    t_len, s_len = segment_length, num_segments
    first = observation(segments[0].steps[0].row)
    keys = sorted(k for k in first if k in obs_spec)
    obs = {
        k: np.zeros((t_len, s_len, *obs_spec[k].shape), np.dtype(obs_spec[k].dtype)) for k in keys
    }
    boot = {k: np.zeros((s_len, *obs_spec[k].shape), np.dtype(obs_spec[k].dtype)) for k in keys}
    pa0 = segments[0].steps[0].row.policy_actions
    pa0 = segments[0].steps[0].row.actions if pa0 is None else pa0
    policy_actions = np.zeros((t_len, s_len, *pa0.shape), pa0.dtype)
    f32 = lambda: np.zeros((t_len, s_len), np.float32)  # noqa: E731
    b = lambda: np.zeros((t_len, s_len), bool)  # noqa: E731
    logp, rewards = f32(), f32()
    dones, ends, valid, intervened, bc_mask = b(), b(), b(), b(), b()
    bc_actions = np.zeros((t_len, s_len, *action_shape), np.float32)
    versions = np.full((t_len, s_len), -1, np.int32)

    def put(dst: dict[str, np.ndarray], index: tuple, o: Mapping[str, np.ndarray], rid: int):
        if sorted(k for k in o if k in obs_spec) != keys:
            raise ValueError(f"transition {rid}: observation keys {sorted(o)}, expected {keys}")
        for k in keys:
            dst[k][index] = np.asarray(o[k]).reshape(obs_spec[k].shape)

    for s, seg in enumerate(segments):
        if len(seg) > t_len:
            raise ValueError(f"segment of {len(seg)} steps: expected at most {t_len}")
        for t, step in enumerate(seg.steps):
            row = step.row
            put(obs, (t, s), observation(row), row.id)
            pa = row.actions if row.policy_actions is None else row.policy_actions
            policy_actions[t, s] = pa
            logp[t, s], rewards[t, s] = row.logp, step.reward
            dones[t, s], ends[t, s], valid[t, s] = step.done, step.time_limit, True
            intervened[t, s] = row.intervened
            versions[t, s] = row.policy_version
            ex = row.executed_actions
            if row.intervened and ex is not None and ex.size == bc_actions[t, s].size:
                bc_actions[t, s] = ex.reshape(action_shape)
                bc_mask[t, s] = True
        last = seg.steps[-1].row if seg.bootstrap is None else seg.bootstrap
        put(boot, (s,), observation(last), last.id)
    return ChunkBatch(
        obs, boot, policy_actions, logp, rewards, dones, ends, valid, intervened, bc_actions,
        bc_mask, versions,
    )  # fmt: skip


def usable_segments(
    source: ReplaySource, segments: list[Segment], obs_spec: ObsSpec
) -> tuple[list[Segment], list[int], Callable[[TransitionRow], dict[str, np.ndarray]]]:
    """(segments to train on, ids to skip for good, observation lookup). Segments whose
    observation keys differ from the first segment's wait for a batch of their own; those
    with unreadable bytes (retention deleted them) or mixed keys are skipped."""
    cache: dict[int, dict[str, np.ndarray]] = {}

    def keys_of(row: TransitionRow) -> tuple[str, ...]:
        if row.id not in cache:
            cache[row.id] = source.observation(row)
        return tuple(sorted(k for k in cache[row.id] if k in obs_spec))

    used, skipped, want = [], [], None
    for seg in segments:
        rows = [s.row for s in seg.steps] + ([seg.bootstrap] if seg.bootstrap else [])
        try:
            keys = {keys_of(r) for r in rows}
        except (MissingRecord, CorruptRecord, ValueError) as e:
            log.warning("learner.segment_unreadable", error=str(e), robot_id=seg.robot_id)
            skipped += seg.ids
            continue
        if len(keys) > 1:
            log.warning("learner.segment_mixed_keys", keys=sorted(keys), robot_id=seg.robot_id)
            skipped += seg.ids
            continue
        want = want or next(iter(keys))
        if keys == {want}:
            used.append(seg)
    return used, skipped, lambda row: cache[row.id]
