"""The trainer's jitted state: sampling for rollouts and one fused learn step per rollout.

`act` is called once per env step, so it takes the weights as a flat list of arrays (jit's
fast path) and the graph definition is closed over, never hashed per call. `learn` fuses
everything after a rollout — values of final and last observations, GAE, the fused PPO
update — into one jitted program, compiled in a background thread at start so compilation
overlaps the first rollout.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openpi_rl.models.finetune import CRITIC
from openpi_rl.rl.actor_critic import ActorCritic
from openpi_rl.rl.ppo import PPOConfig, flatten_rollout, gae_advantages, make_optimizer, ppo_update


class RolloutLearner:
    """Owns (params, optimizer state) of an ActorCritic during `openpi-rl train`.

    Rollout arrays (all numpy, T steps x N envs): obs [T, N, O], actions [T, N, H, D],
    logp, values, rewards [T, N], terminated, truncated [T, N] bool, final_obs [T, N, O]
    (the observation an episode ended on), last_obs [N, O] (after step T-1).
    """

    def __init__(
        self,
        ac: ActorCritic,
        config: PPOConfig,
        seed: int,
        num_steps: int,
        num_envs: int,
        obs_dim: int,
        action_shape: tuple[int, int],
        trainable: nnx.filterlib.Filter = nnx.Param,
        critic_warmup_updates: int = 0,
    ):
        """trainable: what is differentiated and has optimizer state (models/finetune.py's
        `trainable`: every param, or LoRA + value head); the rest stays frozen.
        critic_warmup_updates: updates 0 .. N-1 train the value head alone."""
        self.ac = ac
        self.config = config
        self.trainable, self.critic_warmup_updates = trainable, critic_warmup_updates
        self._critic_opt_state: Any = None  # Adam's state of the head during the warm-up
        self.graphdef, self.params, self.rest = nnx.split(ac, trainable, ...)
        self.opt_state = make_optimizer(config).init(self.params)
        self.key = jax.random.key(seed)
        graphdef = self.graphdef
        _, self._treedef = jax.tree.flatten((self.params, self.rest))
        treedef = self._treedef

        def act(
            leaves: list, key: jax.Array, update: jax.Array, step: jax.Array, obs: jax.Array
        ) -> tuple:
            params, rest = jax.tree.unflatten(treedef, leaves)
            key = jax.random.fold_in(jax.random.fold_in(key, update), step)
            ac = nnx.merge(graphdef, params, rest)
            actions, logp, value, policy_actions = ac.act(key, {"state": obs})
            # One array back to the host instead of three: each transfer costs ~50 us. A
            # continuous policy's policy actions are its actions: not sent twice.
            floats = jnp.concatenate(
                [actions.reshape(obs.shape[0], -1), logp[:, None], value[:, None]], 1
            )
            return floats if policy_actions is actions else (floats, policy_actions)

        def learn(params, rest, opt_state, key, r: dict) -> tuple:
            ac = nnx.merge(graphdef, params, rest)
            value = lambda o: ac.value(key, {"state": o})  # noqa: E731
            t, n = r["rewards"].shape
            final_values = value(r["final_obs"].reshape(t * n, -1)).reshape(t, n)
            adv, ret = gae_advantages(
                r["rewards"], r["values"], r["terminated"], r["truncated"], value(r["last_obs"]),
                config.gamma, config.lam, final_values,
            )  # fmt: skip
            batch = flatten_rollout(
                {"state": r["obs"]}, r["actions"], r["logp"], r["values"], adv, ret
            )
            return ppo_update(graphdef, params, rest, opt_state, key, batch, config)

        self._act = jax.jit(act)
        self._learn_fn = jax.jit(learn)  # the warm-up's: other trees, compiled at first use
        self._action_shape = action_shape
        out = jax.eval_shape(
            act,
            self._leaves_of(),
            self.key,
            0,
            0,
            jax.ShapeDtypeStruct((num_envs, obs_dim), np.float32),
        )
        self._separate = isinstance(out, tuple)
        policy = (
            out[1]
            if self._separate
            else jax.ShapeDtypeStruct((num_envs, *action_shape), np.float32)
        )
        self._sizes = (num_steps, num_envs, obs_dim, policy.shape[1:], policy.dtype)
        spec = self.new_rollout()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), spec)
        lowered = self._learn_fn.lower(self.params, self.rest, self.opt_state, self.key, abstract)
        # XLA compiles without the GIL: the first rollout runs meanwhile on the other core.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self._learn = self._pool.submit(lowered.compile)
        self._pool.shutdown(wait=False)
        self.refresh()

    def _leaves_of(self) -> list:
        return jax.tree.leaves((self.params, self.rest))

    def new_rollout(self) -> dict[str, np.ndarray]:
        """Zeroed rollout buffers of the shapes `learn` expects; "actions" holds the policy
        actions (what the ratio is computed on), not necessarily what the env played."""
        t, n, obs_dim, policy_shape, policy_dtype = self._sizes
        f = lambda *s: np.zeros(s, np.float32)  # noqa: E731
        return {
            "obs": f(t, n, obs_dim), "actions": np.zeros((t, n, *policy_shape), policy_dtype), "logp": f(t, n),
            "values": f(t, n), "rewards": f(t, n), "terminated": np.zeros((t, n), bool),
            "truncated": np.zeros((t, n), bool), "final_obs": f(t, n, obs_dim), "last_obs": f(n, obs_dim),
        }  # fmt: skip

    def refresh(self) -> None:
        """Re-read the flat weights `act` uses (after an update or a restore)."""
        self._leaves = self._leaves_of()

    def act(
        self, update: int, step: int, obs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(actions [N, H, D], log-prob [N], value [N], policy actions [N, ...]) as numpy, sampled with a key derived from
        (seed, update, step) so a resumed run draws what an uninterrupted one would."""
        out = self._act(self._leaves, self.key, np.int32(update), np.int32(step), obs)
        floats = np.asarray(out[0] if self._separate else out)
        actions = floats[:, :-2].reshape(len(obs), *self._action_shape)
        policy_actions = np.asarray(out[1]) if self._separate else actions
        return actions, floats[:, -2], floats[:, -1], policy_actions

    def learn(self, update: int, rollout: dict[str, np.ndarray]) -> dict[str, float]:
        key = jax.random.fold_in(self.key, 2**30 + update)
        if update < self.critic_warmup_updates:
            return self._warm_up(key, rollout)
        learn = self._learn.result()
        self.params, self.opt_state, metrics = learn(
            self.params, self.rest, self.opt_state, key, rollout
        )
        nnx.update(self.ac, self.params)
        self.refresh()
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def _warm_up(self, key: jax.Array, rollout: dict[str, np.ndarray]) -> dict[str, float]:
        """A critic warm-up update: only the value head is differentiated and updated, the
        policy's weights stay bit-identical. The head's Adam state lives for the warm-up only
        (a run resumed during it starts that afresh); the policy's starts after it."""
        _, head, rest = nnx.split(self.ac, CRITIC, ...)
        if self._critic_opt_state is None:
            self._critic_opt_state = make_optimizer(self.config).init(head)
        head, self._critic_opt_state, metrics = self._learn_fn(
            head, rest, self._critic_opt_state, key, rollout
        )
        nnx.update(self.ac, head)
        _, self.params, self.rest = nnx.split(self.ac, self.trainable, ...)
        self.refresh()
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "rest": self.rest}

    def load(self, state: dict[str, Any]) -> None:
        self.params, self.opt_state, self.rest = state["params"], state["opt_state"], state["rest"]
        nnx.update(self.ac, self.params, self.rest)
        self.refresh()
