"""openpi's Pi0-FAST in the RL API: PaliGemma (models/paligemma/) over openpi's prefix, decoding
the PaliGemma token ids of "Action: <FAST ids>|<EOS>" (models/pi0fast_tokens.py).

    [camera 1 tokens]...[camera K tokens][BOS Task: ..., State: ...;\\n][pad]  Action: a_1 ... | EOS
    `--------------- prefix: bidirectional, valid tokens only ------------'  `--- causal, KV cache ---'

Observation (`obs_spec`): each camera in `cameras` as uint8 [H, W, 3] (optional: a missing
camera is masked out, as openpi's image masks do), and the tokenized prompt as openpi's
`Observation` carries it: `tokenized_prompt` int32 [max_token_len] and `tokenized_prompt_mask`
bool [max_token_len]. The prompt string and the state are tokenized outside jit, on the host
that builds the observation, with `Pi0FASTOpenPIConfig.tokenize(prompt, state)` (openpi's
input pipeline: state normalised with the norm stats, 256 bins, "Task: {prompt}, State:
{bins};\\n"); the network reads the state only through that text. `state` float32
[state_dim] is in the spec as an optional entry the network does not read (replay rows keep
it).

Decoding: the prefix is rolled so every row's last valid token sits at its end (openpi's
`left_to_right_align`), prefilled, then one token per step with the KV cache until every row
has emitted EOS (1) or `max_decoding_steps`. Positions follow openpi (prefix 0..P-1, decoded
token i at P + 1 + i), so openpi's checkpoints decode as openpi decodes them. Unlike openpi's
sampler, the decode steps use the exact prefix mask (openpi's decode window is off when a
camera is masked out in the middle of the prefix; with every camera valid the two agree).
`temperature` 0 is greedy (argmax of the raw logits, as openpi); above 0, tokens are drawn
from softmax(logits / temperature), restricted to the `top_k` largest when top_k > 0.

Policy actions and log-probs: the sampled token ids [B, max_decoding_steps] int32 (0 after
EOS) are the policy actions the server, replay and learner store; a chunk's log-prob is the
sum of its token log-probs up to and including the first EOS, under the same temperature and
top-k (greedy: temperature 1), so `policy_logprobs` on the stored tokens (teacher forcing
over the action span) equals the log-prob known while sampling. Continuous actions given to
`policy_logprobs` are re-encoded on the host as openpi's postfix (normalise, FAST, "Action:
... |" EOS). `sample_actions` returns the actions the tokens decode to (openpi's
`extract_actions`, then unnormalised with the norm stats): host callbacks, so they run inside
jit; malformed sequences give zeros, as openpi's.

Value features: the final-norm hidden states of the prefix, mean-pooled over its valid
tokens ([B, width]).

Training from random weights (gym tasks, `for_env`): `constrain_actions` masks each decode step
to the ids that keep the chunk readable ("Action: ", FAST ids adding up to exactly H * D
coefficients, "|", EOS: `allowed_ids`), in sampling and in scoring alike; `prompt` fixes the
task prompt and the model tokenizes each observation's `state` into it (host callback), so a
gym observation is just its state vector.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openpi_rl.models.normalize import NormStats, load_norm_stats, normalize, unnormalize
from openpi_rl.models.paligemma.checkpoint import (
    check_openpi_checkpoint,
    load_openpi_checkpoint,
    save_openpi_checkpoint,
)
from openpi_rl.models.paligemma.paligemma import (
    PALIGEMMA_EOS_TOKEN,
    PaliGemma,
    PaliGemmaConfig,
    make_attn_mask,
)
from openpi_rl.models.pi0fast_tokens import ActionGrammar, Pi0FASTTokenizer
from openpi_rl.models.token_policy import TokenPolicy
from openpi_rl.rl.rl_api import Array, ArraySpec, Observation, ObsSpec

EOS = PALIGEMMA_EOS_TOKEN
PAD = 0
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Pi0FASTOpenPIConfig:
    """`Pi0FASTOpenPIConfig(paligemma_tokenizer=..., fast_tokenizer=...).create(rng)`.
    The tokenizer and norm-stats paths are local files, needed to tokenize prompts and to
    decode actions."""

    gemma_variant: str = "tiny"
    """As `PaliGemmaConfig`: `gemma_2b`, `gemma_2b_lora` are openpi's; `tiny`, `dummy`, `mid`
    are small ones."""
    siglip_variant: str = "tiny"
    """As `PaliGemmaConfig`: `So400m/14` is openpi's; `tiny`, `dummy`, `mid` are small ones."""
    gemma_overrides: tuple[tuple[str, int], ...] = ()
    """(field, value) pairs replacing single fields of the Gemma variant
    (`(("vocab_size", 512),)`)."""
    siglip_overrides: tuple[tuple[str, int], ...] = ()
    """(field, value) pairs replacing single fields of the SigLIP variant (another image
    size)."""
    vocab_size: int | None = None
    """None: the tokenizer's when one is given (the FAST ids sit at its tail), else the
    variant's."""
    paligemma_tokenizer: str | None = None
    """openpi's paligemma_tokenizer.model (or a directory holding it)."""
    fast_tokenizer: str | None = None  # a FAST processor directory
    norm_stats: str | None = None  # openpi's norm_stats.json (or its directory)
    checkpoint: str | None = None
    """The weights every role starts from (version 0): an openpi checkpoint directory (its
    `<step>/`, the `params/` in it, or a released checkpoint's directory), or a version an
    openpi-rl learner published (`<checkpoint_dir>/<N>`: weights/start.py restores it, value
    head included). None: random weights from the seed. LoRA adapters a base checkpoint lacks start at b = 0 (the model is
    the checkpoint's); the value head always starts fresh."""
    use_quantile_norm: bool = True  # openpi normalises Pi0-FAST's data with quantiles
    action_horizon: int = 10  # actions per chunk
    action_dim: int = 3  # numbers per action
    state_dim: int = 4  # width of observation["state"]
    max_token_len: int = 48  # prompt tokens: the width of `tokenized_prompt`
    max_decoding_steps: int = 32  # tokens decoded per chunk at most
    cameras: tuple[str, ...] = ("base_0_rgb",)  # image keys, each optional in an observation
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    constrain_actions: bool = False
    """Decode only chunks openpi's extract_actions can read: "Action: ", FAST ids adding up to
    exactly action_horizon * action_dim coefficients, "|", EOS. openpi samples the whole
    vocabulary; a checkpoint trained on demonstrations writes that format anyway, a model
    from random weights almost never does (for_env turns it on)."""
    prompt: str | None = None
    """A fixed task prompt for observations that carry a state but no tokenized prompt (gym
    tasks): the model tokenizes "Task: {prompt}, State: {bins};" itself (host callback)."""
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)
    param_dtype: str = "float32"  # dtype the weights are stored and updated in
    remat: bool = False  # recompute each layer in the backward pass (less memory)
    scan: bool = True  # False: layers unrolled (faster small models on a CPU)

    def __post_init__(self):
        # A TOML file gives lists ([["vocab_size", 512]]); the config must stay hashable (jit
        # keys compiled functions on it).
        for name in ("gemma_overrides", "siglip_overrides", "cameras"):
            value = getattr(self, name)
            if name != "cameras":
                value = tuple(tuple(pair) for pair in value)
            object.__setattr__(self, name, tuple(value))

    KIND: ClassVar[str] = "pi0_fast_openpi"  # its name in config files and on the CLI
    normalized_actions = False  # actions come out unnormalised, in the robot's units

    @property
    def paligemma(self) -> PaliGemmaConfig:
        gemma = dict(self.gemma_overrides)
        vocab = self.vocab_size
        if vocab is None and self.paligemma_tokenizer is not None and "vocab_size" not in gemma:
            vocab = self.tokenizer().paligemma.vocab_size
        if vocab is not None:
            gemma["vocab_size"] = vocab
        return PaliGemmaConfig(
            self.gemma_variant,
            self.siglip_variant,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            scan=self.scan,
            gemma_overrides=tuple(gemma.items()),
            siglip_overrides=self.siglip_overrides,
        )

    @property
    def value_in_dim(self) -> int:
        return self.paligemma.gemma.width

    @property
    def image_size(self) -> int:
        return self.paligemma.siglip.image_size

    @property
    def obs_spec(self) -> ObsSpec:
        s = self.image_size
        spec = {cam: ArraySpec((s, s, 3), "uint8", optional=True) for cam in self.cameras}
        # With a fixed prompt the model tokenizes the state itself: the state is what it reads.
        fixed = self.prompt is not None
        spec["state"] = ArraySpec((self.state_dim,), "float32", optional=not fixed)
        spec["tokenized_prompt"] = ArraySpec((self.max_token_len,), "int32", optional=fixed)
        spec["tokenized_prompt_mask"] = ArraySpec((self.max_token_len,), "bool", optional=fixed)
        return spec

    @property
    def serving_key_sets(self) -> tuple[tuple[str, ...], ...]:
        """Key sets robots send: every camera and the prompt, with and without the state; with
        a fixed `prompt`, every camera and the state (the model writes it into the prompt)."""
        if self.prompt is not None:
            return ((*self.cameras, "state"),)
        base = (*self.cameras, "tokenized_prompt", "tokenized_prompt_mask")
        return (base, (*base, "state"))

    def for_env(self, obs_dim: int, action_dim: int) -> Pi0FASTOpenPIConfig:
        """This config for a state-only gym task: no cameras; the model writes each state into
        the fixed prompt as openpi's pipeline does (256 bins over [-1, 1]) and decodes only
        well-formed chunks. State and actions stay in the task's units: a robot's norm stats
        do not describe a gym task."""
        config = dataclasses.replace(
            self,
            state_dim=obs_dim,
            action_dim=action_dim,
            cameras=(),
            norm_stats=None,
            prompt=self.prompt if self.prompt is not None else "solve the task",
            constrain_actions=True,
        )
        config.grammar()  # the tokenizer files exist and the chunk fits max_decoding_steps
        return config

    # -- host-side (numpy) tokenization, outside jit

    def tokenizer(self) -> Pi0FASTTokenizer:
        if self.paligemma_tokenizer is None or self.fast_tokenizer is None:
            raise ValueError(
                "paligemma_tokenizer, fast_tokenizer: expected local paths (openpi's "
                "paligemma_tokenizer.model and a FAST processor directory), got None"
            )
        return _load_tokenizer(self.paligemma_tokenizer, self.fast_tokenizer, self.max_token_len)

    def grammar(self) -> ActionGrammar:
        """The tables of `constrain_actions` (from the tokenizer files)."""
        self.tokenizer()  # names the missing file, if one is
        g = _load_grammar(
            self.paligemma_tokenizer, self.fast_tokenizer, self.action_horizon, self.action_dim
        )
        if g.max_len > self.max_decoding_steps:
            raise ValueError(
                f"max_decoding_steps: expected >= {g.max_len} to hold a whole constrained chunk "
                f'("Action: ", up to {g.coeffs} FAST ids, "|", EOS), got '
                f"{self.max_decoding_steps}"
            )
        return g

    def stats(self) -> dict[str, NormStats]:
        return {} if self.norm_stats is None else _load_stats(self.norm_stats)

    def tokenize(self, prompt: str, state: np.ndarray) -> dict[str, np.ndarray]:
        """prompt, raw state [D] -> {"tokenized_prompt", "tokenized_prompt_mask"} as openpi's
        input pipeline makes them (state normalised with the norm stats, when given)."""
        state = np.asarray(state, np.float64)
        if "state" in self.stats():
            state = normalize(state, self.stats()["state"], self.use_quantile_norm)
        tokens, mask, _, _ = self.tokenizer().tokenize(prompt, state)
        return {"tokenized_prompt": tokens.astype(np.int32), "tokenized_prompt_mask": mask}

    def make_obs(
        self, prompt: str, state: np.ndarray, images: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One unbatched observation: the cameras given, the state and its tokenized prompt."""
        obs = {k: np.asarray(v, np.uint8) for k, v in images.items()}
        obs["state"] = np.asarray(state, np.float32)
        return {**obs, **self.tokenize(prompt, state)}

    def tokens_to_actions(self, ids: np.ndarray) -> np.ndarray:
        """Generated ids [B, N] -> unnormalised actions float32 [B, H, D] (openpi's
        extract_actions per row; zeros where malformed)."""
        tok, stats = self.tokenizer(), self.stats()
        out = np.stack(
            [
                tok.extract_actions(np.asarray(row), self.action_horizon, self.action_dim)
                for row in np.asarray(ids)
            ]
        )
        if "actions" in stats:
            out = unnormalize(out, stats["actions"], self.use_quantile_norm)
        return out.astype(np.float32)

    def actions_to_tokens(self, actions: np.ndarray) -> np.ndarray:
        """Raw actions [B, H, D] -> openpi's postfix ids ("Action: ", FAST ids, "|", EOS)
        [B, max_decoding_steps] int32, 0-padded (cut at max_decoding_steps)."""
        tok, stats = self.tokenizer(), self.stats()
        actions = np.asarray(actions, np.float64)
        if "actions" in stats:
            actions = normalize(actions, stats["actions"], self.use_quantile_norm)
        head = tok.paligemma.encode("Action: ")
        tail = tok.paligemma.encode("|", add_eos=True)
        out = np.full((actions.shape[0], self.max_decoding_steps), PAD, np.int32)
        for b, fast_ids in enumerate(tok.fast.encode(actions)):
            ids = head + tok.act_tokens_to_paligemma_tokens(np.asarray(fast_ids)).tolist() + tail
            ids = ids[: self.max_decoding_steps]
            out[b, : len(ids)] = ids
        return out

    # -- models

    def create(self, rng: Array) -> Pi0FASTOpenPI:
        """The model: `checkpoint`'s weights when one is set, else random from `rng`."""
        if self.checkpoint is not None:
            return self.load(self.checkpoint, rng)
        return Pi0FASTOpenPI(self, rngs=nnx.Rngs(rng))

    def load(self, checkpoint_dir: str | pathlib.Path, rng: Array | None = None) -> Pi0FASTOpenPI:
        """The model holding an openpi checkpoint's params (`<ckpt>/<step>/`, or a released
        checkpoint's `params/`: models/paligemma/checkpoint.py's `load_openpi_checkpoint`).
        LoRA adapters a base checkpoint lacks start fresh from `rng` (b = 0: the model is the
        checkpoint's)."""
        rng = jax.random.key(0) if rng is None else rng
        pg = load_openpi_checkpoint(checkpoint_dir, self.paligemma, init_missing_lora=rng)
        return Pi0FASTOpenPI(self, paligemma=pg)

    def check_checkpoint(self) -> None:
        """`checkpoint` (if set) fits this model, from its metadata only (`openpi-rl check`);
        raises FileNotFoundError / ValueError naming the directory and what does not fit."""
        if self.checkpoint is not None:
            check_openpi_checkpoint(self.checkpoint, self.paligemma)

    def fake_obs(self, batch: int = 1) -> dict[str, Array]:
        s = self.image_size
        obs = {cam: jnp.zeros((batch, s, s, 3), jnp.uint8) for cam in self.cameras}
        obs["state"] = jnp.zeros((batch, self.state_dim), jnp.float32)
        if self.paligemma_tokenizer is not None and self.fast_tokenizer is not None:
            one = self.tokenize("do something", np.zeros(self.state_dim))
            tokens, mask = one["tokenized_prompt"], one["tokenized_prompt_mask"]
        else:  # BOS and one token
            tokens = np.zeros(self.max_token_len, np.int32)
            tokens[:2] = (2, 3)
            mask = tokens > 0
        obs["tokenized_prompt"] = jnp.broadcast_to(jnp.asarray(tokens), (batch, tokens.size))
        obs["tokenized_prompt_mask"] = jnp.broadcast_to(jnp.asarray(mask), (batch, mask.size))
        return obs

    def fake_act(self, batch: int = 1) -> Array:
        return jnp.zeros((batch, self.action_horizon, self.action_dim), jnp.float32)


@functools.cache
def _load_tokenizer(pg: str, fast: str, max_len: int) -> Pi0FASTTokenizer:
    return Pi0FASTTokenizer.from_files(pg, fast, max_len)


@functools.cache
def _load_stats(path: str) -> dict[str, NormStats]:
    return load_norm_stats(path)


@functools.cache
def _load_grammar(pg: str, fast: str, horizon: int, dim: int) -> ActionGrammar:
    return Pi0FASTTokenizer.from_files(pg, fast).action_grammar(horizon, dim)


def _batched(fn, trailing: int):
    """A host function of [B, *trailing axes] for any number of leading axes (under vmap);
    it may return one array or a tuple of them, each [B, ...]."""

    def call(x):
        x = np.asarray(x)
        lead = x.shape[: x.ndim - trailing]
        out = fn(x.reshape(-1, *x.shape[x.ndim - trailing :]))
        if isinstance(out, tuple):
            return tuple(o.reshape(*lead, *o.shape[1:]) for o in out)
        return out.reshape(*lead, *out.shape[1:])

    return call


def allowed_ids(g: ActionGrammar, i: Array, written: Array, tail_start: Array) -> Array:
    """The ids a constrained decoder may emit at step `i`, given the FAST characters written
    before it and the step its tail began (anything >= the chunk length: not yet). The three
    arguments broadcast together to a shape S; returns bool [*S, vocab]."""
    i, written, tail_start = (jnp.asarray(a)[..., None] for a in (i, written, tail_start))
    head, tail, char_len = jnp.asarray(g.head), jnp.asarray(g.tail), jnp.asarray(g.char_len)
    ids = jnp.arange(char_len.shape[0])
    head_id = head[jnp.clip(i, 0, len(g.head) - 1)]
    k = i - tail_start
    tail_id = jnp.where(k < len(g.tail), tail[jnp.clip(k, 0, len(g.tail) - 1)], PAD)
    body = (char_len > 0) & (char_len <= g.coeffs - written)
    return jnp.where(i < len(g.head), ids == head_id, jnp.where(k >= 0, ids == tail_id, body))


def _align(x: Array, mask: Array) -> tuple[Array, Array]:
    """Roll each row so its last valid token sits at the end (openpi's left_to_right_align)."""

    def one(x, m):
        last = jnp.max(m * jnp.arange(m.shape[0])) + 1
        return jnp.roll(x, -last, 0), jnp.roll(m, -last, 0)

    return jax.vmap(one)(x, mask)


class Pi0FASTOpenPI(TokenPolicy, nnx.Module):
    def __init__(
        self,
        config: Pi0FASTOpenPIConfig,
        *,
        rngs: nnx.Rngs | None = None,
        paligemma: PaliGemma | None = None,
    ):
        self.config = config
        self.paligemma = (
            paligemma if paligemma is not None else PaliGemma(config.paligemma, rngs=rngs)
        )

    @property
    def obs_spec(self) -> ObsSpec:
        return self.config.obs_spec

    def save_openpi(self, directory: str | pathlib.Path) -> pathlib.Path:
        """This model's weights as an openpi checkpoint (`<directory>/params`, the layout of
        openpi's trainer): what `checkpoint` loads, and openpi itself."""
        return save_openpi_checkpoint(self.paligemma, directory)

    # -- network

    def _prefix(self, obs: Observation) -> tuple[Array, Array]:
        """(embeddings [B, P, W], valid mask [B, P]), right-aligned."""
        c = self.config
        tokens, token_mask = self._prompt(obs)
        b = tokens.shape[0]
        images, masks = [], []
        for cam in c.cameras:
            if cam in obs:
                images.append(jnp.asarray(obs[cam]).astype(jnp.float32) / 255.0 * 2.0 - 1.0)
                masks.append(jnp.ones((b,), bool))
            else:
                images.append(jnp.zeros((b, c.image_size, c.image_size, 3), jnp.float32))
                masks.append(jnp.zeros((b,), bool))
        x, mask, _ = self.paligemma.embed_prefix(
            images,
            masks,
            tokens,
            token_mask,
            jnp.zeros_like(tokens),
        )
        return _align(x, mask)

    def prompt_tokens(self, obs: Observation) -> tuple[Array, Array]:
        """(tokens, mask) the model reads as `obs`'s prompt: to check what it was told."""
        return self._prompt(obs)

    def _prompt(self, obs: Observation) -> tuple[Array, Array]:
        """(tokens int32 [B, L], mask bool [B, L]): the observation's, or with a fixed
        `prompt` its state written into it on the host (openpi's tokenizer)."""
        c = self.config
        if "tokenized_prompt" in obs:
            return (
                jnp.asarray(obs["tokenized_prompt"], jnp.int32),
                jnp.asarray(obs["tokenized_prompt_mask"], bool),
            )
        if c.prompt is None or "state" not in obs:
            raise ValueError(
                "observation: expected tokenized_prompt and tokenized_prompt_mask (or a state, "
                f"with the config's prompt set), got keys {sorted(obs)}"
            )
        state = jax.lax.stop_gradient(jnp.asarray(obs["state"], jnp.float32))
        lead, n = state.shape[:-1], c.max_token_len
        shapes = (
            jax.ShapeDtypeStruct((*lead, n), jnp.int32),
            jax.ShapeDtypeStruct((*lead, n), jnp.bool_),
        )
        return jax.pure_callback(
            _batched(self._tokenize_states, 1), shapes, state, vmap_method="legacy_vectorized"
        )

    def _tokenize_states(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.config.tokenize(self.config.prompt, s) for s in states]
        return (
            np.stack([r["tokenized_prompt"] for r in rows]),
            np.stack([r["tokenized_prompt_mask"] for r in rows]),
        )

    def _logp(self, logits: Array, allowed: Array | None = None) -> Array:
        """Log-probs [..., V] under the sampling temperature and top-k (greedy: temperature 1),
        over the `allowed` ids [..., V] when decoding is constrained."""
        c = self.config
        logits = logits.astype(jnp.float32)
        if allowed is not None:
            if pad := logits.shape[-1] - allowed.shape[-1]:  # embedding rows past the tokenizer's
                allowed = jnp.pad(allowed, [(0, 0)] * (allowed.ndim - 1) + [(0, pad)])
            logits = jnp.where(allowed, logits, _NEG)
        if c.temperature > 0:
            logits = logits / c.temperature
            if c.top_k:
                kth = jax.lax.top_k(logits, c.top_k)[0][..., -1:]
                logits = jnp.where(logits >= kth, logits, _NEG)
        return jax.nn.log_softmax(logits, -1)

    @staticmethod
    def _entropy(logp: Array) -> Array:
        return -jnp.sum(jnp.exp(logp) * jnp.where(logp > -1e29, logp, 0.0), -1)

    @staticmethod
    def _features(hidden: Array, mask: Array) -> Array:
        w = mask[..., None].astype(jnp.float32)
        return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

    def _decode(self, rng: Array, obs: Observation) -> dict[str, Array]:
        return self.decode(rng, obs)  # TokenPolicy's hook

    def decode(self, rng: Array, obs: Observation, greedy: bool | None = None) -> dict[str, Array]:
        """Sample with the KV cache. Returns ids [B, N] int32 (0 after EOS), logp [B],
        entropy [B] (mean per token), steps (taken)."""
        c = self.config
        greedy = c.temperature <= 0 if greedy is None else greedy
        pg = self.paligemma
        x, m = self._prefix(obs)
        b, p, _ = x.shape
        n = c.max_decoding_steps
        attn = m[:, None, :] & m[:, :, None]
        logits, cache = pg.prefill(x, attn, jnp.cumsum(m, -1) - 1, p + n)
        prefill_len = jnp.sum(m, -1)
        slots = jnp.arange(p + n)
        prefix_valid = jnp.pad(m, ((0, 0), (0, n)))
        g = c.grammar() if c.constrain_actions else None

        def step(carry):
            i, last, ids, done, logp, ent, count, cache, written, tail_start = carry
            allowed = None if g is None else allowed_ids(g, i, written, tail_start)
            logp_all = self._logp(last, allowed)
            if greedy:
                tok = jnp.argmax(last if g is None else jnp.where(allowed, last, _NEG), -1)
            else:
                tok = jax.random.categorical(jax.random.fold_in(rng, i), logp_all, -1)
            live = ~done
            tok = jnp.where(live, tok, PAD).astype(jnp.int32)
            tok_logp = jnp.take_along_axis(logp_all, tok[:, None], 1)[:, 0]
            logp = logp + jnp.where(live, tok_logp, 0.0)
            ent = ent + jnp.where(live, self._entropy(logp_all), 0.0)
            count = count + live
            ids = ids.at[:, i].set(tok)
            done = done | (tok == EOS)
            if g is not None:
                written = written + jnp.asarray(g.char_len)[tok]
                tail_start = jnp.where((tail_start > i) & (written >= g.coeffs), i + 1, tail_start)
            mask = jnp.where(slots < p, prefix_valid, slots <= p + i)
            nxt, cache = pg.decode_step(
                pg.embed_tokens(tok[:, None]), (prefill_len + 1 + i)[:, None], mask[:, None], cache
            )
            next_logits = nxt[:, 0].astype(jnp.float32)
            return i + 1, next_logits, ids, done, logp, ent, count, cache, written, tail_start

        def cond(carry):
            return (carry[0] < n) & ~jnp.all(carry[3])

        init = (
            jnp.int32(0),
            logits[:, -1].astype(jnp.float32),
            jnp.full((b, n), PAD, jnp.int32),
            jnp.zeros((b,), bool),
            jnp.zeros((b,)),
            jnp.zeros((b,)),
            jnp.zeros((b,), jnp.int32),
            cache,
            jnp.zeros((b,), jnp.int32),  # FAST characters written (constrained decoding)
            jnp.full((b,), n, jnp.int32),  # the step the tail began at (n: not yet)
        )
        i, _, ids, _, logp, ent, count, *_ = jax.lax.while_loop(cond, step, init)
        return {"ids": ids, "logp": logp, "entropy": ent / jnp.maximum(count, 1), "steps": i}

    def teacher_forced(self, obs: Observation, ids: Array) -> tuple[Array, Array, Array]:
        """One pass over [prefix, ids] at the decoder's positions and masks. Returns (logits
        [B, N, V] predicting ids, prefix hidden [B, P, W] after the final norm, prefix mask)."""
        x, m = self._prefix(obs)
        b, p, _ = x.shape
        n = ids.shape[1]
        prefill_len = jnp.sum(m, -1)
        seq = jnp.concatenate([x, self.paligemma.embed_tokens(ids).astype(x.dtype)], 1)
        input_mask = jnp.concatenate([m, jnp.ones((b, n), bool)], 1)
        ar = jnp.concatenate([jnp.zeros((p,), jnp.int32), jnp.ones((n,), jnp.int32)])[None]
        positions = jnp.concatenate(
            [jnp.cumsum(m, -1) - 1, prefill_len[:, None] + 1 + jnp.arange(n)[None]], 1
        )
        llm = self.paligemma.llm
        hidden, _ = llm.transformer(
            seq, make_attn_mask(input_mask, ar), positions.astype(jnp.int32)
        )
        # Logits of the action span only ([B, N, V], not [B, P + N, V]: V is 257k at full size).
        logits = llm.logits(hidden[:, p - 1 : p - 1 + n])
        return logits.astype(jnp.float32), hidden[:, :p], m

    def _as_ids(self, actions: Array) -> Array:
        """Policy actions -> ids [B, N]: stored tokens pass through; continuous actions are
        re-encoded on the host (openpi's postfix)."""
        actions = jnp.asarray(actions)
        if jnp.issubdtype(actions.dtype, jnp.integer):
            return actions.astype(jnp.int32)
        c = self.config
        shape = jax.ShapeDtypeStruct((*actions.shape[:-2], c.max_decoding_steps), jnp.int32)
        return jax.pure_callback(
            _batched(c.actions_to_tokens, 2),
            shape,
            jax.lax.stop_gradient(actions),
            vmap_method="legacy_vectorized",
        )

    def _to_actions(self, ids: Array) -> Array:
        c = self.config
        shape = jax.ShapeDtypeStruct((*ids.shape[:-1], c.action_horizon, c.action_dim), jnp.float32)
        return jax.pure_callback(
            _batched(c.tokens_to_actions, 1), shape, ids, vmap_method="legacy_vectorized"
        )

    def _allowed_along(self, ids: Array) -> Array | None:
        """The constrained decoder's allowed ids at every step of `ids` [B, N] ([B, N, V])."""
        c = self.config
        if not c.constrain_actions:
            return None
        g = c.grammar()
        n = ids.shape[-1]
        char_len = jnp.asarray(g.char_len)[ids]
        written = jnp.cumsum(char_len, -1) - char_len
        reached = written >= g.coeffs
        tail_start = jnp.where(reached.any(-1), jnp.argmax(reached, -1), n)
        return allowed_ids(g, jnp.arange(n), written, tail_start[..., None])

    def _token_logps(self, obs: Observation, ids: Array):
        logits, hidden, m = self.teacher_forced(obs, ids)
        logp_all = self._logp(logits, self._allowed_along(ids))
        tok_logp = jnp.take_along_axis(logp_all, ids[..., None], -1)[..., 0]
        is_eos = ids == EOS
        live = ~(jnp.cumsum(is_eos, 1) - is_eos > 0)  # up to and including the first EOS
        return tok_logp, live, self._entropy(logp_all), self._features(hidden, m)

    # -- the RL API (the rest is TokenPolicy's)

    def value_features(self, rng: Array, obs: Observation) -> Array:
        x, m = self._prefix(obs)
        hidden, _ = self.paligemma.llm.transformer(
            x, m[:, None, :] & m[:, :, None], (jnp.cumsum(m, -1) - 1).astype(jnp.int32)
        )
        return self._features(hidden, m)
