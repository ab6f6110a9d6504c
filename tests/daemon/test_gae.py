"""GAE over action chunks: padded segment columns, terminal steps, time-limit ends and cuts."""

import numpy as np
import pytest
import rlax

from openpi_rl.daemon import chunk_gae


def test_chunk_gae_by_hand():
    # One segment of three chunks, gamma 0.9, lambda 0.8, cut after the last (bootstrap 0.3).
    r, v = np.array([[1.0], [0.0], [2.0]]), np.array([[0.5], [0.2], [0.1]])
    z = np.zeros((3, 1), bool)
    adv, ret = chunk_gae(r, v, np.array([0.3]), z, z, ~z, 0.9, 0.8)
    d2, d1, d0 = 2 + 0.9 * 0.3 - 0.1, 0 + 0.9 * 0.1 - 0.2, 1 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(ret, adv + v, rtol=1e-6)
    # Terminal last chunk: no bootstrap.
    done = np.array([[False], [False], [True]])
    adv, _ = chunk_gae(r, v, np.array([0.3]), done, z, ~z, 0.9, 0.8)
    a2 = 2 - 0.1
    np.testing.assert_allclose(adv[:, 0], [d0 + 0.72 * (d1 + 0.72 * a2), d1 + 0.72 * a2, a2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunk_gae_equals_rlax_per_segment(seed):
    rng = np.random.default_rng(seed)
    t_len, s_len, gamma, lam = 12, 7, 0.97, 0.9
    lengths = rng.integers(1, t_len + 1, s_len)
    lengths[0] = t_len
    valid = np.arange(t_len)[:, None] < lengths[None]
    rewards = rng.standard_normal((t_len, s_len)).astype(np.float32)
    values = rng.standard_normal((t_len, s_len)).astype(np.float32)
    boot = rng.standard_normal(s_len).astype(np.float32)
    dones = (rng.random((t_len, s_len)) < 0.15) & valid
    ends = (rng.random((t_len, s_len)) < 0.15) & valid & ~dones
    # Padding holds garbage: it must not leak into any real step.
    rewards[~valid], values[~valid] = 1e3, -1e3

    adv, ret = chunk_gae(rewards, values, boot, dones, ends, valid, gamma, lam)
    adv, ret = np.asarray(adv), np.asarray(ret)
    for s in range(s_len):
        n = lengths[s]
        next_v = np.append(values[1:n, s], boot[s])
        stop = dones[:n, s] | ends[:n, s]
        stop[-1] = True  # the segment ends: a cut or an episode end
        boot_here = stop & ~dones[:n, s]  # time-limit end or cut: reward carries gamma * V(next)
        # rlax knows only episode ends: fold the bootstrap into the reward, discount 0 after it.
        r = rewards[:n, s] + gamma * next_v * boot_here
        discount = gamma * (1.0 - stop)
        v = np.append(values[:n, s], 0.0)
        expected = rlax.truncated_generalized_advantage_estimation(r, discount, lam, v)
        np.testing.assert_allclose(adv[:n, s], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[:n, s], adv[:n, s] + values[:n, s], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(adv[~valid], 0.0)
