"""openpi's Pi0-FAST tokenization and normalisation, from local files.

Owns the text side of openpi's Pi0-FAST pipeline, numpy only, outside any jit:

- `PaligemmaTokenizer`: the PaliGemma SentencePiece model (`paligemma_tokenizer.model`, which
  openpi fetches from gs://big_vision/paligemma_tokenizer.model) via `sentencepiece`.
- `FASTActionTokenizer`: the FAST action tokenizer of the `physical-intelligence/fast`
  processor directory (Pertsch et al. 2025): DCT-II (orthonormal) along time, round(coeff *
  scale), shift by `min_token`, one character per coefficient, byte-level BPE from the
  directory's `tokenizer.json` via `tokenizers`; decoding inverts it and, as the processor
  does, yields an all-zero chunk when the ids do not decode to exactly horizon * dim
  coefficients.
- `Pi0FASTTokenizer`: openpi's `FASTTokenizer` (`src/openpi/models/tokenizer.py`): the prefix
  "Task: {prompt}, State: {256-bin state};\\n" with BOS, the postfix "Action: " + FAST ids
  mapped onto the tail of PaliGemma's vocabulary + "|" + EOS, the token/ar/loss masks, padding
  and truncation to `max_len`, and `extract_actions` back from generated ids.

openpi's `norm_stats.json` and its z-score / quantile transforms are `models/normalize.py`.

Nothing is downloaded: each loader takes a local path, and a missing file is a
`FileNotFoundError` naming the file and where it goes. Models and policies use this module;
it imports nothing from the rest of the project.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Sequence

import numpy as np
import scipy.fft

logger = logging.getLogger(__name__)

PALIGEMMA_TOKENIZER_FILE = "paligemma_tokenizer.model"
FAST_TOKENIZER_FILE = "tokenizer.json"
FAST_PROCESSOR_CONFIG_FILE = "processor_config.json"
FAST_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# openpi skips the last 128 PaliGemma ids (the <seg> tokens) when placing FAST ids.
FAST_SKIP_TOKENS = 128
# openpi discretises the normalised state into 256 bins over [-1, 1].
STATE_BINS = 256


def require_file(
    path: str | pathlib.Path, what: str, where: str, name: str | None = None
) -> pathlib.Path:
    """`path`, or `path/name` when `path` is a directory and `name` is given; a missing file is
    a FileNotFoundError saying what it is and where it goes (nothing is downloaded)."""
    path = pathlib.Path(path)
    if name is not None and path.is_dir():
        path = path / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: file not found at {path}; {where}. Nothing is downloaded: "
            "put the file there (or pass its path)."
        )
    return path


class PaligemmaTokenizer:
    """The PaliGemma SentencePiece model (Gemma's vocabulary plus <loc>/<seg> pieces)."""

    def __init__(self, model_path: str | pathlib.Path):
        import sentencepiece

        path = require_file(
            model_path,
            "PaliGemma tokenizer",
            f"expected {PALIGEMMA_TOKENIZER_FILE} (openpi's "
            "gs://big_vision/paligemma_tokenizer.model, 257152 pieces)",
            name=PALIGEMMA_TOKENIZER_FILE,
        )
        self.path = path
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return list(self._sp.encode(text, add_bos=add_bos, add_eos=add_eos))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class FASTActionTokenizer:
    """FAST: action chunk [H, D] <-> variable-length BPE ids in [0, vocab_size).

    Built from a processor directory (`from_directory`) holding `tokenizer.json` and
    `processor_config.json`, as `physical-intelligence/fast` stores them. `decode_failures`
    counts chunks that decoded to zeros because their ids were malformed.
    """

    def __init__(
        self,
        bpe,  # tokenizers.Tokenizer
        *,
        scale: float,
        vocab_size: int,
        min_token: int,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
        self._bpe = bpe
        self.scale = float(scale)
        self.vocab_size = int(vocab_size)
        self.min_token = int(min_token)
        self.time_horizon = time_horizon
        self.action_dim = action_dim
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.decode_failures = 0

    @classmethod
    def from_directory(cls, directory: str | pathlib.Path) -> FASTActionTokenizer:
        from tokenizers import Tokenizer

        directory = pathlib.Path(directory)
        where = (
            f"the FAST processor directory {directory} (a local copy of physical-intelligence/fast)"
        )
        tok_path = require_file(
            directory / FAST_TOKENIZER_FILE, "FAST BPE tokenizer", f"it belongs in {where}"
        )
        cfg_path = require_file(
            directory / FAST_PROCESSOR_CONFIG_FILE,
            "FAST processor config (scale, vocab_size, min_token)",
            f"it belongs in {where}",
        )
        config = json.loads(cfg_path.read_text())
        for key in ("scale", "min_token"):
            if key not in config:
                raise ValueError(f"{cfg_path}: expected a {key!r} entry, got keys {sorted(config)}")
        clean_up = False
        tok_cfg_path = directory / FAST_TOKENIZER_CONFIG_FILE
        if tok_cfg_path.is_file():
            clean_up = bool(
                json.loads(tok_cfg_path.read_text()).get("clean_up_tokenization_spaces", False)
            )
        bpe = Tokenizer.from_file(str(tok_path))
        return cls(
            bpe,
            scale=config["scale"],
            vocab_size=config.get("vocab_size", bpe.get_vocab_size()),
            min_token=config["min_token"],
            time_horizon=config.get("time_horizon"),
            action_dim=config.get("action_dim"),
            clean_up_tokenization_spaces=clean_up,
        )

    def encode(self, actions: np.ndarray) -> list[list[int]]:
        """actions [H, D] or [B, H, D] -> one list of BPE ids per chunk."""
        actions = np.asarray(actions)
        if actions.ndim == 2:
            actions = actions[None]
        if actions.ndim != 3:
            raise ValueError(f"actions: expected [H, D] or [B, H, D], got shape {actions.shape}")
        coeffs = np.around(scipy.fft.dct(actions, axis=1, norm="ortho") * self.scale)
        out = []
        for chunk in coeffs:
            # Frequency-major order (all dims of frequency 0 first); values below min_token clip.
            chars = np.maximum(chunk.reshape(-1) - self.min_token, 0).astype(int)
            out.append(self._bpe.encode("".join(map(chr, chars))).ids)
        return out

    def decode_one(
        self, ids: Sequence[int], time_horizon: int, action_dim: int
    ) -> tuple[np.ndarray, bool]:
        """BPE ids -> (actions float64 [time_horizon, action_dim], ok).

        Not ok (and all zeros, as the FAST processor returns) when the ids are not valid
        unsigned ints or do not decode to exactly time_horizon * action_dim coefficients.
        Ids past the BPE vocabulary are skipped by `tokenizers`, as in the processor.
        """
        try:
            text = self._bpe.decode([int(i) for i in ids], skip_special_tokens=False)
        except (OverflowError, TypeError, ValueError):  # e.g. a negative id
            text = None
        if text is not None and self.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        if text is None or len(text) != time_horizon * action_dim:
            self.decode_failures += 1
            return np.zeros((time_horizon, action_dim)), False
        coeffs = np.array([ord(c) for c in text], dtype=np.int64) + self.min_token
        coeffs = coeffs.reshape(time_horizon, action_dim)
        return scipy.fft.idct(coeffs / self.scale, axis=0, norm="ortho"), True

    def decode(
        self,
        tokens: Sequence[Sequence[int]],
        time_horizon: int | None = None,
        action_dim: int | None = None,
    ) -> np.ndarray:
        """Lists of BPE ids -> actions float64 [B, H, D]; malformed chunks are zeros."""
        time_horizon = time_horizon or self.time_horizon
        action_dim = action_dim or self.action_dim
        if time_horizon is None or action_dim is None:
            raise ValueError(
                "time_horizon, action_dim: expected ints (here or in processor_config.json), "
                f"got {time_horizon!r}, {action_dim!r}"
            )
        return np.stack([self.decode_one(ids, time_horizon, action_dim)[0] for ids in tokens])


def _clean_up_tokenization(text: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization, used when the tokenizer's
    # config sets clean_up_tokenization_spaces (physical-intelligence/fast sets it false).
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalised state [D] -> bin ids [D] in [-1, 255], as openpi (below -1 gives -1)."""
    bins = np.linspace(-1, 1, STATE_BINS + 1)[:-1]
    return np.digitize(state, bins=bins) - 1


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    """One openpi Pi0-FAST token sequence, padded or truncated to max_len.

    tokens int32 [max_len] (padding 0); token_mask bool [max_len] (real tokens); ar_mask int32
    [max_len] (0: prefix, attended bidirectionally; 1: postfix, causal); loss_mask bool
    [max_len] (the postfix: "Action: ", the FAST ids, "|", EOS).
    """

    tokens: np.ndarray
    token_mask: np.ndarray
    ar_mask: np.ndarray
    loss_mask: np.ndarray

    def __iter__(self):
        return iter((self.tokens, self.token_mask, self.ar_mask, self.loss_mask))


@dataclasses.dataclass(frozen=True)
class ActionGrammar:
    """What a well-formed Pi0-FAST postfix may hold, as tables over PaliGemma ids.

    A postfix is `head` ("Action: "), then FAST ids whose texts add up to exactly `coeffs`
    characters (one per DCT coefficient: action_horizon * action_dim), then `tail` ("|" and
    EOS). head, tail: int32 ids; char_len: int32 [vocab_size], the characters a PaliGemma id
    writes as a FAST id (0: not a FAST id, or not the id FAST's encoder writes for its own
    text, such as half of a multi-byte character).
    """

    head: np.ndarray
    tail: np.ndarray
    char_len: np.ndarray
    coeffs: int

    @property
    def max_len(self) -> int:
        """The longest well-formed postfix (one character per FAST id)."""
        return len(self.head) + self.coeffs + len(self.tail)


class Pi0FASTTokenizer:
    """openpi's FASTTokenizer: prompt + state (+ actions) <-> PaliGemma ids.

    `malformed_actions` counts `extract_actions` calls whose ids held no "Action: " or whose
    FAST ids did not decode; both give an all-zero chunk, as openpi returns.
    """

    def __init__(
        self,
        paligemma: PaligemmaTokenizer,
        fast: FASTActionTokenizer,
        max_len: int = 256,
        fast_skip_tokens: int = FAST_SKIP_TOKENS,
    ):
        if max_len < 1:
            raise ValueError(f"max_len: expected >= 1, got {max_len}")
        if paligemma.vocab_size - 1 - fast_skip_tokens - (fast.vocab_size - 1) < 0:
            raise ValueError(
                f"fast.vocab_size: expected <= {paligemma.vocab_size - fast_skip_tokens} to fit "
                f"PaliGemma's vocabulary of {paligemma.vocab_size} less {fast_skip_tokens} "
                f"skipped ids, got {fast.vocab_size}"
            )
        self.paligemma = paligemma
        self.fast = fast
        self.max_len = max_len
        self.fast_skip_tokens = fast_skip_tokens
        self.malformed_actions = 0

    @classmethod
    def from_files(
        cls,
        paligemma_model: str | pathlib.Path,
        fast_directory: str | pathlib.Path,
        max_len: int = 256,
    ) -> Pi0FASTTokenizer:
        return cls(
            PaligemmaTokenizer(paligemma_model),
            FASTActionTokenizer.from_directory(fast_directory),
            max_len,
        )

    def act_tokens_to_paligemma_tokens(self, tokens: np.ndarray | Sequence[int]) -> np.ndarray:
        """FAST ids <-> PaliGemma ids (the map is its own inverse): V - 1 - skip - id."""
        return self.paligemma.vocab_size - 1 - self.fast_skip_tokens - np.asarray(tokens)

    def action_grammar(self, action_horizon: int, action_dim: int) -> ActionGrammar:
        """The tables that constrain decoding to postfixes `extract_actions` can decode."""
        head = np.asarray(self.paligemma.encode("Action: "), np.int32)
        tail = np.asarray(self.paligemma.encode("|", add_eos=True), np.int32)
        char_len = np.zeros(self.paligemma.vocab_size, np.int32)
        for fast_id in range(self.fast.vocab_size):
            text = self.fast._bpe.decode([fast_id], skip_special_tokens=False)
            # Only ids FAST's own encoder writes for their text: not half characters, not
            # duplicates of another id's text, not characters the encoder drops.
            if text and self.fast._bpe.encode(text).ids == [fast_id]:
                char_len[self.act_tokens_to_paligemma_tokens(fast_id)] = len(text)
        if np.any(char_len[np.concatenate([head, tail])] > 0):
            raise ValueError(
                "PaliGemma tokenizer: 'Action: ' or '|' encodes to ids that FAST also uses; "
                "these files do not form openpi's Pi0-FAST vocabulary"
            )
        return ActionGrammar(head, tail, char_len, action_horizon * action_dim)

    def prefix_text(self, prompt: str, state: np.ndarray) -> str:
        cleaned = prompt.lower().strip().replace("_", " ")
        state_str = " ".join(map(str, discretize_state(np.asarray(state))))
        return f"Task: {cleaned}, State: {state_str};\n"

    def tokenize(
        self, prompt: str, state: np.ndarray, actions: np.ndarray | None = None
    ) -> TokenizedPrompt:
        """prompt, normalised state [D], normalised actions [H, D] or None -> TokenizedPrompt.

        Unpacks as openpi's tuple: `tokens, token_mask, ar_mask, loss_mask = tok.tokenize(...)`.
        """
        state = np.asarray(state)
        if state.ndim != 1:
            raise ValueError(f"state: expected a normalised vector [D], got shape {state.shape}")
        prefix = self.paligemma.encode(self.prefix_text(prompt, state), add_bos=True)
        postfix: list[int] = []
        if actions is not None:
            actions = np.asarray(actions)
            if actions.ndim != 2:
                raise ValueError(
                    f"actions: expected a normalised chunk [H, D], got shape {actions.shape}"
                )
            fast_ids = self.fast.encode(actions[None])[0]
            postfix = (
                self.paligemma.encode("Action: ")
                + self.act_tokens_to_paligemma_tokens(np.asarray(fast_ids, dtype=np.int64)).tolist()
                + self.paligemma.encode("|", add_eos=True)
            )
        n = len(prefix) + len(postfix)
        if n > self.max_len:
            logger.warning(
                "Pi0-FAST token length %d exceeds max_len %d, truncating; raise max_len if this is frequent",
                n,
                self.max_len,
            )
        size = max(n, self.max_len)
        tokens = np.zeros(size, np.int32)
        tokens[:n] = prefix + postfix
        token_mask = np.arange(size) < n
        ar_mask = np.zeros(size, np.int32)
        ar_mask[len(prefix) : n] = 1
        loss_mask = ar_mask.astype(bool)
        cut = slice(0, self.max_len)
        return TokenizedPrompt(tokens[cut], token_mask[cut], ar_mask[cut], loss_mask[cut])

    def extract_actions(
        self, tokens: np.ndarray, action_horizon: int, action_dim: int
    ) -> np.ndarray:
        """Generated PaliGemma ids [N] -> actions float32 [action_horizon, action_dim].

        As openpi: decode the ids to text, take what lies between "Action: " and the first "|",
        re-encode it, map back to FAST ids and FAST-decode. Zeros when malformed (counted).
        """
        text = self.paligemma.decode(np.asarray(tokens).tolist())
        if "Action: " not in text:
            self.malformed_actions += 1
            return np.zeros((action_horizon, action_dim), np.float32)
        raw = self.paligemma.encode(text.split("Action: ")[1].split("|")[0].strip())
        fast_ids = self.act_tokens_to_paligemma_tokens(np.asarray(raw, dtype=np.int64))
        actions, ok = self.fast.decode_one(fast_ids.tolist(), action_horizon, action_dim)
        if not ok:
            self.malformed_actions += 1
        return actions.astype(np.float32)
