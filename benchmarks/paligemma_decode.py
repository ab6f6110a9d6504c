"""openpi's PaliGemma decoding (Pi0-FAST `sample_actions`), ours against openpi's own code on
the same weights: prefill time and greedy decode tokens/s at batch 1.

    python benchmarks/paligemma_decode.py             # tiny and mid, ours and openpi's
    python benchmarks/paligemma_decode.py --quick     # tiny, 8 steps, ours and openpi's
    python benchmarks/paligemma_decode.py --quick --no-openpi

Models: `tiny` (Gemma width 128, depth 2, vocab 1024; SigLIP tiny) and `mid` (width 512,
depth 6, PaliGemma's 257,152-token vocabulary; SigLIP tiny), float32, random weights, except
that token 1's embedding row (EOS, tied with the output) is zeroed so greedy decoding never
stops early. Input: 3 cameras of 56x56 (16 patches each) and a 64-token prompt with 48 valid
tokens: a 112-position prefix. What is timed is the whole call, as a robot's request runs it:
SigLIP, the prefix embedding, the prefill and the decoding loop (ours: `embed_prefix` then
`sample_tokens`; openpi's: `Pi0FAST.sample_actions`, which also preprocesses the
observation). With 1 step the call is the prefill plus one step (`prefill_ms`); decode
tokens/s = (N - 1) / (t_N - t_1). Medians of interleaved repeats; the machine is shared.

openpi's side runs when the scratch environment of tests/fixtures/openpi_pi0_fast/README.md
exists (/work/scratch/openpi-venv, openpi's source at /work/scratch/openpi-src/src; override
with OPENPI_VENV / OPENPI_SRC): this script saves our weights as an openpi checkpoint
(`ours_to_openpi`, orbax), and a subprocess in that venv patches openpi's variant tables to
these sizes (as make_golden.py does), restores them with openpi's `restore_params`, builds
the model with `Pi0FASTConfig.load` and times its jitted `sample_actions` the same way. Both
decode greedily and their tokens are compared (`same_tokens`). Ratios: ours decode tokens/s
over openpi's, ours prefill ms over openpi's (below 1: ours is faster).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.models.paligemma import PaliGemmaConfig, ours_to_openpi, sample_tokens
from openpi_rl.models.paligemma.memory import SIGLIP_FOR

CAMERAS = ("base_0_rgb", "base_1_rgb", "wrist_0_rgb")  # openpi's names
PROMPT_LEN, VALID_TOKENS = 64, 48
OPENPI_VENV = Path(os.environ.get("OPENPI_VENV", "/work/scratch/openpi-venv"))
OPENPI_SRC = Path(os.environ.get("OPENPI_SRC", "/work/scratch/openpi-src/src"))


@dataclasses.dataclass
class Args:
    variants: tuple[str, ...] = ("tiny", "mid")
    steps: int = 64  # decoding steps of the long call
    repeats: int = 11
    openpi: bool = True  # also time openpi's own sample_actions (when its venv exists)
    quick: bool = False


def _config(variant: str) -> PaliGemmaConfig:
    return PaliGemmaConfig(variant, SIGLIP_FOR[variant], dtype="float32")


def _inputs(config: PaliGemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    size = config.siglip.image_size
    out = {f"image/{c}": r.uniform(-1, 1, (1, size, size, 3)).astype(np.float32) for c in CAMERAS}
    tokens = np.zeros((1, PROMPT_LEN), np.int32)
    tokens[0, 0] = 2  # BOS
    tokens[0, 1:VALID_TOKENS] = r.integers(3, config.gemma.vocab_size, VALID_TOKENS - 1)
    out["tokens"] = tokens
    out["token_mask"] = np.arange(PROMPT_LEN)[None] < VALID_TOKENS
    return out


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def _rates(fns: dict[int, object], args: tuple, steps: int, repeats: int) -> dict:
    """fns: {1: call with 1 step, steps: call with `steps` steps}, each already compiled."""
    t1, tn = [], []
    for _ in range(repeats):
        t1.append(_timed(fns[1], *args))
        tn.append(_timed(fns[steps], *args))
    m1, mn = statistics.median(t1), statistics.median(tn)
    return {
        "prefill_ms": round(1000 * m1, 3),
        # None: the noise of a shared machine exceeded the decoding time (too few repeats)
        "decode_tok_per_s": round((steps - 1) / (mn - m1), 1) if mn > m1 else None,
        f"call_{steps}_steps_ms": round(1000 * mn, 3),
    }


def ours(model, inputs: dict[str, np.ndarray], steps: int, repeats: int):
    graphdef, state = nnx.split(model)

    def make(n: int):
        @jax.jit
        def call(state, images, tokens, token_mask):
            m = nnx.merge(graphdef, state)
            masks = [jnp.ones((1,), bool)] * len(images)
            prefix, input_mask, ar = m.embed_prefix(
                images, masks, tokens, token_mask, jnp.zeros_like(tokens)
            )
            return sample_tokens(m, jax.random.key(0), prefix, input_mask, ar, n)

        return call

    fns = {n: make(n) for n in (1, steps)}
    args = (
        state,
        [jnp.asarray(inputs[f"image/{c}"]) for c in CAMERAS],
        jnp.asarray(inputs["tokens"]),
        jnp.asarray(inputs["token_mask"]),
    )
    tokens = np.asarray(fns[steps](*args)).astype(np.int32)  # compiles
    for _ in range(2):
        _timed(fns[1], *args), _timed(fns[steps], *args)
    return _rates(fns, args, steps, repeats), tokens


# Runs in openpi's scratch venv (jax 0.5.3, flax 0.10.2, openpi's source on PYTHONPATH).
OPENPI_WORKER = r"""
import json, statistics, sys, time
from pathlib import Path
import jax, jax.numpy as jnp, ml_collections, numpy as np
from flax import nnx
import openpi.models.gemma_fast as _gemma
import openpi.models.model as _model
import openpi.models.pi0_fast as _pi0_fast
import openpi.models.siglip as _siglip

d = Path(sys.argv[1])
meta = json.loads((d / "meta.json").read_text())
gemma = {**meta["gemma"], "norm_eps": 1e-6, "scan": True, "remat_policy": "nothing_saveable"}
orig_cfg, orig_sig = _gemma.get_config, _siglip.decode_variant
_gemma.get_config = lambda v: ml_collections.ConfigDict({"variant": v, **gemma}) if v == "gemma_2b" else orig_cfg(v)
siglip = {**meta["siglip"], "patch_size": tuple(meta["siglip"]["patch_size"])}
_siglip.decode_variant = lambda v: dict(siglip) if v == "So400m/14" else orig_sig(v)
res = tuple(meta["image_resolution"])
_model.IMAGE_RESOLUTION = res
_model.preprocess_observation.__kwdefaults__["image_resolution"] = res

cfg = _pi0_fast.Pi0FASTConfig(dtype="float32", paligemma_variant="gemma_2b", action_dim=4,
                              action_horizon=4, max_token_len=meta["prompt_len"])
model = cfg.load(_model.restore_params(d / "params", restore_type=np.ndarray))
x = dict(np.load(d / "inputs.npz"))
obs = _model.Observation(
    images={c: jnp.asarray(x[f"image/{c}"]) for c in meta["cameras"]},
    image_masks={c: jnp.ones((1,), bool) for c in meta["cameras"]},
    state=jnp.zeros((1, 4), jnp.float32),
    tokenized_prompt=jnp.asarray(x["tokens"]),
    tokenized_prompt_mask=jnp.asarray(x["token_mask"]),
    token_ar_mask=jnp.zeros_like(jnp.asarray(x["tokens"])),
    token_loss_mask=jnp.zeros(x["tokens"].shape, bool),
)
graphdef, state = nnx.split(model)

def make(n):
    return jax.jit(lambda st, o: nnx.merge(graphdef, st).sample_actions(
        jax.random.key(0), o, max_decoding_steps=n, temperature=0.0))

steps, repeats = meta["steps"], meta["repeats"]
fns = {n: make(n) for n in (1, steps)}
tokens = np.asarray(fns[steps](state, obs)).astype(np.int32)
for _ in range(2):
    jax.block_until_ready(fns[1](state, obs)); jax.block_until_ready(fns[steps](state, obs))
t1, tn = [], []
for _ in range(repeats):
    for n, acc in ((1, t1), (steps, tn)):
        t = time.perf_counter(); jax.block_until_ready(fns[n](state, obs)); acc.append(time.perf_counter() - t)
m1, mn = statistics.median(t1), statistics.median(tn)
print(json.dumps({"prefill_ms": round(1000 * m1, 3),
                  "decode_tok_per_s": round((steps - 1) / (mn - m1), 1) if mn > m1 else None,
                  f"call_{steps}_steps_ms": round(1000 * mn, 3),
                  "tokens": tokens.tolist(), "jax": jax.__version__}))
"""


def openpi_available() -> bool:
    return (OPENPI_VENV / "bin" / "python").exists() and (OPENPI_SRC / "openpi").is_dir()


def openpi(model, inputs: dict[str, np.ndarray], steps: int, repeats: int) -> dict:
    import orbax.checkpoint as ocp

    config = model.config
    g, s = config.gemma, config.siglip
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with ocp.PyTreeCheckpointer() as ckptr:  # a released checkpoint's layout
            ckptr.save((d / "params").absolute(), {"params": ours_to_openpi(model)})
        np.savez(d / "inputs.npz", **inputs)
        meta = {
            "gemma": {
                k: getattr(g, k)
                for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
            }
            | {"vocab_size": g.vocab_size},
            "siglip": {
                "width": s.width,
                "depth": s.depth,
                "mlp_dim": s.mlp_dim,
                "num_heads": s.num_heads,
                "patch_size": [s.patch_size, s.patch_size],
            },
            "image_resolution": [s.image_size, s.image_size],
            "prompt_len": PROMPT_LEN,
            "cameras": list(CAMERAS),
            "steps": steps,
            "repeats": repeats,
        }
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "worker.py").write_text(OPENPI_WORKER)
        env = {
            **os.environ,
            "PYTHONPATH": str(OPENPI_SRC),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        }
        out = subprocess.run(
            [str(OPENPI_VENV / "bin" / "python"), str(d / "worker.py"), str(d)],
            capture_output=True, text=True, timeout=1800, env=env, cwd=tmp,
        )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"openpi's worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args: Args) -> dict:
    variants = ("tiny",) if args.quick else args.variants
    steps = 8 if args.quick else args.steps
    repeats = 3 if args.quick else args.repeats
    run_openpi = args.openpi and openpi_available()
    if args.openpi and not run_openpi:
        print(f"openpi's venv not found ({OPENPI_VENV}, {OPENPI_SRC}): ours only", file=sys.stderr)
    result: dict = {
        "steps": steps,
        "prefix_len": len(CAMERAS) * 16 + PROMPT_LEN,
        "openpi": run_openpi,
    }
    for variant in variants:
        config = _config(variant)
        model = config.create(jax.random.key(0))
        table = model.llm.embedder.input_embedding
        table[...] = table[...].at[1].set(0.0)  # EOS never wins: every call decodes `steps`
        inputs = _inputs(config)
        row: dict = {"params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))}
        row["ours"], tokens = ours(model, inputs, steps, repeats)
        if run_openpi:
            theirs = openpi(model, inputs, steps, repeats)
            row["same_tokens"] = theirs.pop("tokens") == tokens.tolist()
            row["openpi_jax"] = theirs.pop("jax")
            row["openpi"] = theirs
            a, b = row["ours"]["decode_tok_per_s"], theirs["decode_tok_per_s"]
            row["decode_ours_over_openpi"] = round(a / b, 2) if a and b else None
            row["prefill_ours_over_openpi"] = round(
                row["ours"]["prefill_ms"] / theirs["prefill_ms"], 2
            )
        line = f"{variant:5} ({row['params']:,} params): ours prefill {row['ours']['prefill_ms']:.2f} ms, decode {row['ours']['decode_tok_per_s']} tok/s"  # fmt: skip
        if run_openpi:
            line += (
                f" | openpi prefill {row['openpi']['prefill_ms']:.2f} ms, decode "
                f"{row['openpi']['decode_tok_per_s']} tok/s | ratios: decode "
                f"{row['decode_ours_over_openpi']}x, prefill {row['prefill_ours_over_openpi']}x"
                f" | same tokens {row['same_tokens']}"
            )
        print(line, file=sys.stderr, flush=True)
        result[variant] = row
    result["load"] = round(os.getloadavg()[0], 1)
    return result


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
