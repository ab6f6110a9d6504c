"""Our own Pi0FAST-style token policy: a decoder-only transformer over a multimodal prefix and
autoregressive action tokens, at configurable size (Black et al. 2024, pi0; Pertsch et al.
2025, FAST).

    [image patches][prompt tokens][state] [BOA] a_1 a_2 ... a_k [EOA]
    `------ prefix: bidirectional ------'  `-- causal, decoded with a KV cache --'

The prefix attends to itself in both directions; action tokens attend to the prefix and to
earlier action tokens. The tokenizer (FAST: DCT coefficients, low frequencies first; or
uniform binning) turns N = H * D tokens into an action chunk [H, D] in [-1, 1]. The policy may
end a chunk early with the end-of-actions token EOA (the missing coefficients are zero), and
decoding stops once every row has ended: a policy that never emits EOA costs at most N steps.

Log-probs: a chunk's log-prob is the sum of its token log-probs up to and including EOA, under
the same temperature / top-k as sampling, so a log-prob stored when serving and one recomputed
by the learner agree. The exact form needs the sampled tokens ("policy actions", [B, N + 1]
int32); given continuous actions, `policy_logprobs` re-encodes them (then the chunk is taken
as N tokens without an early EOA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openpi_rl.models.action_tokenizer import ActionTokenizer, make_tokenizer
from openpi_rl.models.token_policy import TokenPolicy
from openpi_rl.rl.rl_api import Array, ArraySpec, Observation, ObsSpec

Variant = Literal["dummy", "small", "gemma_300m", "gemma_2b"]


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


# gemma_300m and gemma_2b follow Gemma's shapes (multi-query attention, head_dim 256), the two
# experts of pi0; `small` keeps gemma_300m's width at two layers so the seed's default
# `value_in_dim=1024` holds on a CPU.
VARIANTS: dict[str, TransformerSize] = {
    "dummy": TransformerSize(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32),
    "small": TransformerSize(width=1024, depth=2, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=128),
    "gemma_300m": TransformerSize(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": TransformerSize(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Pi0FASTConfig:
    """`Pi0FASTConfig(variant="dummy").create(rng)`; defaults give 1024-wide value features."""

    variant: Variant = "small"  # the transformer's size (VARIANTS; "dummy" for tests)
    action_horizon: int = 10  # actions per chunk
    action_dim: int = 7  # numbers per action
    state_dim: int = 8  # width of observation["state"]
    image_keys: tuple[str, ...] = ("image",)  # each optional in an observation
    image_size: int = 224  # images are square uint8 [image_size, image_size, 3]
    patch_size: int = 16  # pixels per side of one image token
    prompt_len: int = 16  # 0: no prompt input
    prompt_vocab_size: int = 257  # bytes + padding, the prompt tokenizer a robot can run
    tokenizer: Literal["fast", "binning"] = "fast"  # action tokens: FAST's DCT, or uniform bins
    fast_scale: float = 10.0  # FAST: DCT coefficients are multiplied by this, then rounded
    num_bins: int = 256  # binning: bins per action value over [-1, 1]
    temperature: float = 1.0  # sampling temperature of the action tokens
    top_k: int = 0  # 0: the whole vocabulary
    value_pooling: Literal["mean", "last"] = "mean"
    """How the value head reads the prefix: "mean" of its valid positions, or "last": the position
    before the first action token."""
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)

    @property
    def size(self) -> TransformerSize:
        return VARIANTS[self.variant]

    @property
    def value_in_dim(self) -> int:
        return self.size.width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prefix_len(self) -> int:
        return len(self.image_keys) * self.num_patches + self.prompt_len + 1

    @property
    def obs_spec(self) -> ObsSpec:
        spec = {"state": ArraySpec((self.state_dim,), "float32")}
        for key in self.image_keys:
            spec[key] = ArraySpec((self.image_size, self.image_size, 3), "uint8", optional=True)
        if self.prompt_len:
            spec["prompt_tokens"] = ArraySpec((self.prompt_len,), "int32", optional=True)
            spec["prompt_mask"] = ArraySpec((self.prompt_len,), "bool", optional=True)
        return spec

    @property
    def serving_key_sets(self) -> tuple[tuple[str, ...], ...]:
        """Key sets robots send (a server compiles these before it reports ready): every
        camera and the state, with and without a prompt."""
        base = (*self.image_keys, "state")
        return (base, (*base, "prompt_tokens", "prompt_mask")) if self.prompt_len else (base,)

    def action_tokenizer(self) -> ActionTokenizer:
        return _tokenizer(
            self.tokenizer, self.action_horizon, self.action_dim, self.fast_scale, self.num_bins
        )

    KIND: ClassVar[str] = "pi0_fast"  # its name in config files and on the CLI
    normalized_actions = True  # actions in [-1, 1], rescaled to the env's bounds

    def for_env(self, obs_dim: int, action_dim: int) -> Pi0FASTConfig:
        """This config for a state-only gym task (no images, no prompt)."""
        return dataclasses.replace(
            self, state_dim=obs_dim, action_dim=action_dim, image_keys=(), prompt_len=0
        )

    def create(self, rng: Array) -> Pi0FAST:
        return Pi0FAST(self, rngs=nnx.Rngs(rng))

    def fake_obs(self, batch: int = 1) -> dict[str, Array]:
        obs = {"state": jnp.zeros((batch, self.state_dim), jnp.float32)}
        for key in self.image_keys:
            obs[key] = jnp.zeros((batch, self.image_size, self.image_size, 3), jnp.uint8)
        if self.prompt_len:
            obs["prompt_tokens"] = jnp.zeros((batch, self.prompt_len), jnp.int32)
            obs["prompt_mask"] = jnp.ones((batch, self.prompt_len), bool)
        return obs

    def fake_act(self, batch: int = 1) -> Array:
        return jnp.zeros((batch, self.action_horizon, self.action_dim), jnp.float32)


@functools.cache
def _tokenizer(kind: str, horizon: int, dim: int, scale: float, bins: int) -> ActionTokenizer:
    kwargs = {"scale": scale} if kind == "fast" else {"num_bins": bins}
    return make_tokenizer(kind, horizon, dim, **kwargs)


# ----------------------------------------------------------------------------- transformer


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention. q [B, T, H, hd]; k, v [B, S, K, hd] (H divisible by K);
    mask [B, T, S] bool (True: may attend). Returns [B, T, H * hd]."""
    b, t, h, hd = q.shape
    kh = k.shape[2]
    # Heads before positions in q, k, v ([B, T or S, hd] each, small) so that the dots take
    # and give the logits [B, K, G, T, S] in the layout softmax reads, instead of XLA
    # transposing the logits (T * S per head, the big array here) around the softmax.
    q = q.reshape(b, t, kh, h // kh, hd).transpose(0, 2, 3, 1, 4)
    logits = jnp.einsum("bkgtd,bkds->bkgts", q, k.transpose(0, 2, 3, 1))
    logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32) / math.sqrt(hd), -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.transpose(0, 2, 1, 3))
    return out.reshape(b, t, h * hd)


# A decode step attends one query per row to a cache of S = P + N + 1 slots, so its cost is
# reading the cache. The cache is laid out for that read and for an in-place write:
#   keys   [B * K, hd, S]  transposed, so the logits dot runs along contiguous slots;
#   values [B * K, S, hd]  so probs @ values is a plain matrix product.
# Batch and kv-head axes are merged because XLA bitcasts away a size-1 kv-head axis (K = 1 in
# every variant) before the dot; fused with the cache update, that bitcast made XLA copy the
# whole cache several times per step instead of writing one slot in place.


def cache_from_prefix(k: Array, v: Array, free: int) -> tuple[Array, Array]:
    """Prefix keys and values [B, P, K, hd] -> a decode cache with `free` empty slots after
    them: keys [B * K, hd, P + free], values [B * K, P + free, hd]."""
    b, p, kh, hd = k.shape
    keys = k.transpose(0, 2, 3, 1).reshape(b * kh, hd, p)
    values = v.transpose(0, 2, 1, 3).reshape(b * kh, p, hd)
    return jnp.pad(keys, ((0, 0), (0, 0), (0, free))), jnp.pad(values, ((0, 0), (0, free), (0, 0)))


def cache_write(cache: tuple[Array, Array], k: Array, v: Array, pos: Array) -> tuple[Array, Array]:
    """Write one token's k, v [B, 1, K, hd] into slot `pos` (a dynamic_update_slice that XLA
    does in place when its result is the cache's only use)."""
    keys, values = cache
    b, _, kh, hd = k.shape
    keys = jax.lax.dynamic_update_slice_in_dim(keys, k.reshape(b * kh, hd, 1), pos, 2)
    values = jax.lax.dynamic_update_slice_in_dim(values, v.reshape(b * kh, 1, hd), pos, 1)
    return keys, values


def cached_attention(q: Array, cache: tuple[Array, Array], mask: Array) -> Array:
    """`attention` of one query per row against a cache. q [B, 1, H, hd]; cache as written
    by `cache_write`; mask [B, S] bool (True: a filled slot the query may attend).
    Returns [B, 1, H * hd]."""
    keys, values = cache
    b, _, h, hd = q.shape
    kh = keys.shape[0] // b
    q = q.reshape(b * kh, h // kh, hd)
    logits = jnp.einsum("xgd,xds->xgs", q, keys).astype(jnp.float32) / math.sqrt(hd)
    logits = jnp.where(jnp.repeat(mask, kh, axis=0)[:, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    return jnp.einsum("xgs,xsd->xgd", probs, values).reshape(b, 1, h * hd)


class Block(nnx.Module):
    """Pre-norm transformer block, Gemma-style: RMSNorm, multi-query attention, gated GELU MLP."""

    def __init__(self, size: TransformerSize, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.size = size
        lin = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(size.width, dtype=dtype, rngs=rngs)
        self.q = lin(size.width, size.num_heads * size.head_dim)
        self.kv = lin(size.width, 2 * size.num_kv_heads * size.head_dim)
        self.out = lin(size.num_heads * size.head_dim, size.width)
        self.mlp_norm = nnx.RMSNorm(size.width, dtype=dtype, rngs=rngs)
        self.gate_up = lin(size.width, 2 * size.mlp_dim)
        self.down = lin(size.mlp_dim, size.width)

    def qkv(self, x: Array) -> tuple[Array, Array, Array]:
        s, (b, t, _) = self.size, x.shape
        h = self.attn_norm(x)
        q = self.q(h).reshape(b, t, s.num_heads, s.head_dim)
        k, v = jnp.split(self.kv(h).reshape(b, t, 2 * s.num_kv_heads, s.head_dim), 2, axis=2)
        return q, k, v

    def finish(self, x: Array, q: Array, k: Array, v: Array, mask: Array) -> Array:
        return self.mix(x, attention(q, k, v, mask))

    def mix(self, x: Array, attended: Array) -> Array:
        """The rest of the block after attention. x [B, T, W]; attended [B, T, H * hd]."""
        x = x + self.out(attended)
        gate, up = jnp.split(self.gate_up(self.mlp_norm(x)), 2, axis=-1)
        return x + self.down(jax.nn.gelu(gate) * up)


class Pi0FAST(TokenPolicy, nnx.Module):
    def __init__(self, config: Pi0FASTConfig, *, rngs: nnx.Rngs):
        self.config = config
        size, dtype = config.size, jnp.dtype(config.dtype)
        tok = config.action_tokenizer()
        self.num_tokens = tok.num_tokens
        self.boa, self.eoa = tok.vocab_size, tok.vocab_size + 1
        self.vocab = tok.vocab_size + 2
        w = size.width
        self.patch_embed = nnx.Linear(config.patch_size**2 * 3, w, dtype=dtype, rngs=rngs)
        self.prompt_embed = nnx.Embed(config.prompt_vocab_size, w, dtype=dtype, rngs=rngs)
        self.state_embed = nnx.Linear(config.state_dim, w, dtype=dtype, rngs=rngs)
        self.action_embed = nnx.Embed(self.vocab, w, dtype=dtype, rngs=rngs)
        seq = config.prefix_len + self.num_tokens + 1
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, w), jnp.float32))
        self.blocks = nnx.List([Block(size, dtype, rngs) for _ in range(size.depth)])
        self.final_norm = nnx.RMSNorm(w, dtype=dtype, rngs=rngs)
        # A bias lets the policy hold a prior over tokens, EOA's above all.
        self.head = nnx.Linear(w, self.vocab, dtype=dtype, rngs=rngs)

    @property
    def obs_spec(self) -> ObsSpec:
        return self.config.obs_spec

    # -- embeddings

    def _prefix(self, obs: Observation) -> tuple[Array, Array]:
        """(embeddings [B, P, W], valid mask [B, P]) of images, prompt and state."""
        c = self.config
        state = jnp.asarray(obs["state"], jnp.float32)
        b = state.shape[0]
        parts, masks = [], []
        for key in c.image_keys:
            if key in obs:
                img = jnp.asarray(obs[key]).astype(jnp.float32) / 127.5 - 1.0
                g = c.image_size // c.patch_size
                patches = img.reshape(b, g, c.patch_size, g, c.patch_size, 3)
                patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
                parts.append(self.patch_embed(patches))
                masks.append(jnp.ones((b, g * g), bool))
            else:
                parts.append(jnp.zeros((b, c.num_patches, c.size.width), self.pos_embed.dtype))
                masks.append(jnp.zeros((b, c.num_patches), bool))
        if c.prompt_len:
            tokens = obs.get("prompt_tokens", jnp.zeros((b, c.prompt_len), jnp.int32))
            parts.append(self.prompt_embed(jnp.clip(tokens, 0, c.prompt_vocab_size - 1)))
            default = jnp.full((b, c.prompt_len), "prompt_tokens" in obs)
            masks.append(jnp.asarray(obs.get("prompt_mask", default), bool))
        parts.append(self.state_embed(state)[:, None])
        masks.append(jnp.ones((b, 1), bool))
        x = jnp.concatenate([p.astype(jnp.float32) for p in parts], 1)
        return x + self.pos_embed[None, : x.shape[1]], jnp.concatenate(masks, 1)

    def _embed_actions(self, ids: Array, start: int | Array) -> Array:
        """ids [B, T] at sequence positions start .. start + T - 1."""
        pos = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, ids.shape[1], 0)
        return self.action_embed(ids).astype(jnp.float32) + pos[None]

    def _logits(self, h: Array, index: Array) -> Array:
        """Processed logits [B, T, V] for action-token positions `index` [T] (0 .. N): the same
        temperature, top-k and end rule in sampling and in `policy_logprobs`. After N tokens
        only EOA may follow."""
        c = self.config
        logits = self.head(self.final_norm(h)).astype(jnp.float32) / c.temperature
        if c.top_k:
            kth = jax.lax.top_k(logits, c.top_k)[0][..., -1:]
            logits = jnp.where(logits >= kth, logits, -1e30)
        only_eoa = jnp.arange(self.vocab) == self.eoa
        last = (index == self.num_tokens)[None, :, None]
        return jnp.where(last & ~only_eoa, -1e30, logits)

    # -- full forward (teacher forcing) and cached decoding

    def forward(self, obs: Observation, ids: Array) -> tuple[Array, Array, Array]:
        """Teacher-forced pass over prefix + [BOA, ids[:, :-1]]. ids: [B, N + 1] target tokens.

        Returns (logits [B, N + 1, V] predicting ids, prefix hidden [B, P, W], prefix mask).
        """
        x_pre, m_pre = self._prefix(obs)
        b, p = m_pre.shape
        inputs = jnp.concatenate([jnp.full((b, 1), self.boa), ids[:, :-1]], 1)
        x = jnp.concatenate([x_pre, self._embed_actions(inputs, p)], 1)
        t = inputs.shape[1]
        # Prefix rows see the valid prefix; action rows see it plus earlier actions.
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = jnp.concatenate(
            [
                jnp.concatenate([jnp.broadcast_to(m_pre[:, None], (b, p, p)), jnp.zeros((b, p, t), bool)], 2),
                jnp.concatenate([jnp.broadcast_to(m_pre[:, None], (b, t, p)), jnp.broadcast_to(causal, (b, t, t))], 2),
            ],
            1,
        )  # fmt: skip
        for blk in self.blocks:
            q, k, v = blk.qkv(x)
            x = blk.finish(x, q, k, v, mask)
        return self._logits(x[:, p:], jnp.arange(t)), x[:, :p], m_pre

    def _features(self, h_pre: Array, m_pre: Array) -> Array:
        h = self.final_norm(h_pre).astype(jnp.float32)
        if self.config.value_pooling == "last":
            return h[:, -1]
        w = m_pre[..., None].astype(jnp.float32)
        return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

    def _decode(
        self, rng: Array, obs: Observation, greedy: bool = False, keep_logits: bool = False
    ) -> dict[str, Array]:
        """Sample tokens with a KV cache until every row has emitted EOA (at most N + 1 steps).

        Returns ids [B, N + 1] (EOA-padded), logp [B], entropy [B] (mean per token), i (the
        steps taken), and with `keep_logits` the logits of every step [B, N + 1, V] (for tests
        against the full forward pass; off on the serving path, where carrying them costs a
        copy per step).
        """
        x, m_pre = self._prefix(obs)
        b, p = m_pre.shape
        n1 = self.num_tokens + 1
        mask = jnp.broadcast_to(m_pre[:, None], (b, p, p))
        caches = []
        for blk in self.blocks:
            q, k, v = blk.qkv(x)
            x = blk.finish(x, q, k, v, mask)
            caches.append(cache_from_prefix(k, v, n1))
        # Step i's noise is drawn with fold_in(rng, i) as `jax.random.categorical` would (the
        # same tokens), but all at once: drawn inside the loop, threefry runs as two nested
        # while loops per step on a CPU, the larger part of a small model's step.
        if not greedy:
            keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n1))
            noise = jax.vmap(lambda key: jax.random.gumbel(key, (b, self.vocab)))(keys)
        slots = jnp.arange(p + n1)

        def step(carry: dict) -> dict:
            i = carry["i"]
            h = self._embed_actions(carry["last"][:, None], p + i)
            # The prefix's valid slots and the action slots written so far, this one included.
            valid = jnp.where(slots < p, jnp.pad(m_pre, ((0, 0), (0, n1))), slots <= p + i)
            new_caches = []
            for blk, cache in zip(self.blocks, carry["caches"], strict=True):
                q, k, v = blk.qkv(h)
                # Written before it is read, so the write is the cache's only update (in place).
                cache = cache_write(cache, k, v, p + i)
                h = blk.mix(h, cached_attention(q, cache, valid))
                new_caches.append(cache)
            logits = self._logits(h, i[None])[:, 0]
            logp_all = jax.nn.log_softmax(logits)
            tok = jnp.argmax(logits if greedy else logits + noise[i], -1)
            done = carry["done"]
            tok = jnp.where(done, self.eoa, tok).astype(jnp.int32)
            live = ~done
            ent = -jnp.sum(jnp.exp(logp_all) * jnp.where(logp_all > -1e29, logp_all, 0.0), -1)
            tok_logp = jnp.take_along_axis(logp_all, tok[:, None], 1)[:, 0]
            out = {
                "i": i + 1,
                "last": tok,
                "done": done | (tok == self.eoa),
                "ids": carry["ids"].at[:, i].set(tok),
                "logp": carry["logp"] + jnp.where(live, tok_logp, 0.0),
                "ent": carry["ent"] + jnp.where(live, ent, 0.0),
                "count": carry["count"] + live,
                "caches": new_caches,
            }
            if keep_logits:
                out["logits"] = carry["logits"].at[:, i].set(logits)
            return out

        init = {
            "i": jnp.int32(0),
            "last": jnp.full((b,), self.boa, jnp.int32),
            "done": jnp.zeros((b,), bool),
            "ids": jnp.full((b, n1), self.eoa, jnp.int32),
            "logp": jnp.zeros((b,)),
            "ent": jnp.zeros((b,)),
            "count": jnp.zeros((b,), jnp.int32),
            "caches": caches,
        }
        if keep_logits:
            init["logits"] = jnp.zeros((b, n1, self.vocab))
        out = jax.lax.while_loop(lambda c: (c["i"] < n1) & ~jnp.all(c["done"]), step, init)
        del out["caches"]
        out["entropy"] = out["ent"] / jnp.maximum(out["count"], 1)
        return out

    def decode(
        self, rng: Array, obs: Observation, greedy: bool = False, keep_logits: bool = False
    ) -> dict[str, Array]:
        """A chunk's tokens as `sample_actions` draws them (greedy: argmax), with their logp,
        entropy and steps taken `i`; `keep_logits`: every step's logits (to check decoding)."""
        return self._decode(rng, obs, greedy=greedy, keep_logits=keep_logits)

    def _to_actions(self, ids: Array) -> Array:
        """Tokens [B, N + 1] -> actions [B, H, D]; everything from the first EOA on is padding."""
        body = ids[:, :-1]
        is_action = body < self.config.action_tokenizer().vocab_size
        num_valid = jnp.argmin(jnp.concatenate([is_action, jnp.zeros_like(is_action[:, :1])], 1), 1)
        return self.config.action_tokenizer().decode(jnp.where(is_action, body, 0), num_valid)

    def _as_ids(self, actions: Array) -> Array:
        """Policy actions -> token ids [B, N + 1]: stored tokens pass through; continuous
        actions are re-encoded as N tokens followed by EOA."""
        actions = jnp.asarray(actions)
        if jnp.issubdtype(actions.dtype, jnp.integer):
            return actions.astype(jnp.int32)
        tokens = self.config.action_tokenizer().encode(actions)
        return jnp.concatenate([tokens, jnp.full((tokens.shape[0], 1), self.eoa, jnp.int32)], 1)

    def _token_logps(self, obs: Observation, ids: Array) -> tuple[Array, Array, Array, Array]:
        logits, h_pre, m_pre = self.forward(obs, ids)
        logp_all = jax.nn.log_softmax(logits)
        tok_logp = jnp.take_along_axis(logp_all, ids[..., None], -1)[..., 0]
        # Tokens up to and including the first EOA count; what follows is padding.
        ended_before = jnp.cumsum(ids == self.eoa, 1) - (ids == self.eoa) > 0
        live = ~ended_before
        ent = -jnp.sum(jnp.exp(logp_all) * jnp.where(logp_all > -1e29, logp_all, 0.0), -1)
        return tok_logp, live, ent, self._features(h_pre, m_pre)

    # -- the RL API (the rest is TokenPolicy's)

    def value_features(self, rng: Array, obs: Observation) -> Array:
        x, m_pre = self._prefix(obs)
        b, p = m_pre.shape
        mask = jnp.broadcast_to(m_pre[:, None], (b, p, p))
        for blk in self.blocks:
            q, k, v = blk.qkv(x)
            x = blk.finish(x, q, k, v, mask)
        return self._features(x, m_pre)


def param_count(config: Pi0FASTConfig) -> int:
    """Parameters of a variant, from shapes only (`nnx.eval_shape`): nothing is allocated."""
    abstract = nnx.eval_shape(lambda: Pi0FAST(config, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))
