"""CLIP's byte-level BPE tokenizer, read from a pretrained directory's own files.

Token ids equal those of transformers 5.x `CLIPTokenizer.from_pretrained(dir)` (the
`tokenizers`-backed one) on the same files, with `padding="max_length",
truncation=True, max_length=max_len`:

  1. Special tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token, any
     `added_tokens` of a tokenizer.json) are cut out of the text first and become
     their own ids. Ones flagged `normalized=False` are matched in the raw text,
     the others after step 2 (so `<|STARTOFTEXT|>` can match while
     `<|ENDOFTEXT|>` does not in the SD 1.x files). SD 2.x pads with `!`, which
     then is a special token too: "wow!!" gives `wow</w> ! !`, exactly as
     transformers does.
  2. Each remaining piece is cleaned as transformers does *without* ftfy (it no
     longer uses ftfy or HTML unescaping at all): Unicode NFC, every run of
     whitespace -> one space, lower case character by character (so a final
     capital sigma becomes `σ`, not `ς`).
  3. CLIP's regex splits words (`'s|'t|...|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`,
     whitespace dropped; one token per digit), then GPT-2's byte-level regex
     splits them again (this only matters for a literal `<|endoftext|>` piece),
     and bytes are mapped to GPT-2's printable characters.
  4. Byte-level BPE with `</w>` on the last symbol of a word, merges applied in
     rank order (lowest rank first, leftmost first, as `tokenizers` does).
  5. `<|startoftext|>` + tokens + `<|endoftext|>`; longer texts keep their first
     `max_len - 2` tokens (EOS stays last); padded with the pad token. The mask is
     True on BOS..EOS, so an empty caption has 2 True entries.

`CLIPTokenizer.from_dir(path)` reads either layout a pretrained `tokenizer/` folder
comes in: `vocab.json` + `merges.txt` (the published SD 1.x/2.x repositories) or
`tokenizer.json` (what transformers 5 writes on `save_pretrained`), plus
`tokenizer_config.json` / `special_tokens_map.json` for the special tokens and
`model_max_length` (default 77).
"""

from __future__ import annotations

import heapq
import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import regex

from diffjax.text.base import check_texts

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LEN = 77

# CLIP's word splitter and GPT-2's (the ByteLevel pre-tokenizer re-splits CLIP's words with it).
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards, in byte order."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = bytes_to_unicode()


class CLIPTokenizer:
    """CLIP BPE: captions -> (ids int32 [B, max_len], mask bool [B, max_len]).

    Args:
      vocab: token -> id.
      merges: BPE merges, in rank order, as (left, right) pairs.
      max_len: L (77 for every Stable Diffusion text encoder).
      bos_token / eos_token / pad_token / unk_token: as in the directory's files.
      added_tokens: (content, normalized) for every token cut out of the text before
        BPE (default: the four special tokens, BOS normalized, the rest not).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_len: int = DEFAULT_MAX_LEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        added_tokens: Sequence[tuple[str, bool]] | None = None,
    ):
        if int(max_len) < 2:
            raise ValueError(f"max_len must be >= 2 (BOS and EOS), got {max_len}.")
        self.max_len = int(max_len)
        self.vocab = dict(vocab)
        for name, token in (
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("pad_token", pad_token),
        ):
            if token not in self.vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary.")
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            bos_token,
            eos_token,
            pad_token,
            unk_token,
        )
        self.bos_id, self.eos_id, self.pad_id = (
            self.vocab[bos_token],
            self.vocab[eos_token],
            self.vocab[pad_token],
        )
        self.unk_id = self.vocab.get(unk_token)
        self.vocab_size = max(self.vocab.values()) + 1

        self.ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            if len(pair) != 2:
                raise ValueError(f"merge {rank} is {pair!r}, expected two symbols.")
            a, b = pair
            for part in (a, b, a + b):
                if part not in self.vocab:
                    raise ValueError(
                        f"merge {rank} ({a!r} {b!r}) uses {part!r}, which is not in the vocabulary."
                    )
            self.ranks.setdefault((a, b), rank)

        if added_tokens is None:
            added_tokens = [
                (t, t == bos_token)
                for t in dict.fromkeys((bos_token, eos_token, unk_token, pad_token))
            ]
        self.added_tokens = [(t, bool(n)) for t, n in added_tokens if t]
        for token, _ in self.added_tokens:
            if token not in self.vocab:
                raise ValueError(f"special token {token!r} is not in the vocabulary.")
        self._raw_special = self._alternation([t for t, n in self.added_tokens if not n])
        self._norm_special = self._alternation([t for t, n in self.added_tokens if n])
        self._clip_re = regex.compile(_CLIP_PATTERN)
        self._gpt2_re = regex.compile(_GPT2_PATTERN)
        self._cache: dict[str, list[int]] = {}

    @staticmethod
    def _alternation(tokens: list[str]) -> Any:
        """Leftmost-longest matcher for `tokens` (None if there are none)."""
        if not tokens:
            return None
        ordered = sorted(set(tokens), key=len, reverse=True)
        return regex.compile("|".join(regex.escape(t) for t in ordered))

    # -- text -> token ids -------------------------------------------------------------

    @staticmethod
    def normalize(text: str) -> str:
        """NFC, whitespace runs -> one space, per-character lower case (transformers' normalizer)."""
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
        return "".join(c.lower() for c in text)

    @staticmethod
    def _split(text: str, matcher: Any) -> list[tuple[str, bool]]:
        """text -> [(piece, is_special)], specials being the matcher's matches."""
        if matcher is None:
            return [(text, False)]
        out, start = [], 0
        for m in matcher.finditer(text):
            out.append((text[start : m.start()], False))
            out.append((m.group(), True))
            start = m.end()
        out.append((text[start:], False))
        return out

    def tokens(self, text: str) -> list[int]:
        """One caption -> its token ids, without BOS/EOS, padding or truncation."""
        ids: list[int] = []
        for raw, special in self._split(text, self._raw_special):
            if special:
                ids.append(self.vocab[raw])
                continue
            for piece, special2 in self._split(self.normalize(raw), self._norm_special):
                if special2:
                    ids.append(self.vocab[piece])
                    continue
                for word in self._clip_re.findall(piece):
                    for sub in self._gpt2_re.findall(word):
                        ids.extend(self._bpe("".join(_BYTE_CHARS[b] for b in sub.encode("utf-8"))))
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Byte-level word -> ids, merging the lowest-ranked adjacent pair first (leftmost on ties)."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word)
        symbols[-1] += "</w>"
        n = len(symbols)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            rank = self.ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None:
                heap.append((rank, i, symbols[i], symbols[i + 1]))
        heapq.heapify(heap)
        while heap:
            rank, i, left, right = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or symbols[i] != left or symbols[j] != right:
                continue  # stale entry
            symbols[i] = left + right
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            p, q = prv[i], nxt[i]
            if p >= 0:
                r = self.ranks.get((symbols[p], symbols[i]))
                if r is not None:
                    heapq.heappush(heap, (r, p, symbols[p], symbols[i]))
            if q < n:
                r = self.ranks.get((symbols[i], symbols[q]))
                if r is not None:
                    heapq.heappush(heap, (r, i, symbols[i], symbols[q]))
        ids = []
        for k in range(n):
            if not alive[k]:
                continue
            tid = self.vocab.get(symbols[k], self.unk_id)
            if tid is None:
                raise ValueError(
                    f"symbol {symbols[k]!r} is not in the vocabulary and there is no unk token."
                )
            ids.append(tid)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (ids [B, max_len] int32, mask [B, max_len] bool), BOS/EOS added."""
        texts = check_texts(texts)
        ids = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.max_len), bool)
        for i, text in enumerate(texts):
            row = [self.bos_id, *self.tokens(text)[: self.max_len - 2], self.eos_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(max_len={self.max_len}, vocab_size={self.vocab_size}, merges={len(self.ranks)}, "
            f"pad={self.pad_token!r})"
        )

    # -- files -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, max_len: int | None = None) -> CLIPTokenizer:
        """A pretrained tokenizer folder -> CLIPTokenizer.

        Reads `vocab.json` + `merges.txt` if both exist, else `tokenizer.json`; the special
        tokens from `special_tokens_map.json` over `tokenizer_config.json` (defaults: BOS
        `<|startoftext|>`, EOS/pad/unk `<|endoftext|>`); `max_len` defaults to the config's
        `model_max_length` (else 77).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer directory {str(path)!r} does not exist.")
        config = _read_json(path / "tokenizer_config.json", optional=True) or {}
        special_map = _read_json(path / "special_tokens_map.json", optional=True) or {}
        if not isinstance(config, dict) or not isinstance(special_map, dict):
            raise ValueError(
                f"{path}: tokenizer_config.json and special_tokens_map.json must hold JSON objects."
            )
        entries = {k: special_map.get(k, config.get(k)) for k in _SPECIAL_KEYS}
        defaults = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": EOS_TOKEN,
        }
        names = {k: _token_content(entries[k], k, path) or defaults[k] for k in _SPECIAL_KEYS}

        vocab_file, merges_file, json_file = (
            path / "vocab.json",
            path / "merges.txt",
            path / "tokenizer.json",
        )
        if vocab_file.exists() or merges_file.exists():
            vocab = _read_vocab(vocab_file)
            merges = _read_merges(merges_file)
            added = _added_from_configs(entries, names)
        elif json_file.exists():
            vocab, merges, added = _read_tokenizer_json(json_file)
            for key in _SPECIAL_KEYS:  # a special token the json does not list is still special
                if names[key] not in {t for t, _ in added}:
                    added.append((names[key], False))
        else:
            raise FileNotFoundError(
                f"{path} holds no CLIP tokenizer: expected vocab.json + merges.txt (published SD repositories) "
                "or tokenizer.json (transformers' save_pretrained)."
            )
        if max_len is None:
            max_len = _model_max_length(config, path)
        try:
            return cls(
                vocab,
                merges,
                max_len=max_len,
                bos_token=names["bos_token"],
                eos_token=names["eos_token"],
                pad_token=names["pad_token"],
                unk_token=names["unk_token"],
                added_tokens=added,
            )
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _read_json(file: Path, optional: bool = False) -> Any:
    if not file.exists():
        if optional:
            return None
        raise FileNotFoundError(f"{file} is missing.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}).") from None


def _read_vocab(file: Path) -> dict[str, int]:
    if not file.exists():
        raise FileNotFoundError(
            f"{file} is missing: a CLIP tokenizer needs vocab.json beside merges.txt."
        )
    vocab = _read_json(file)
    if (
        not isinstance(vocab, dict)
        or not vocab
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vocab.values()
        )
    ):
        raise ValueError(
            f"{file} must be a JSON object mapping each token to a non-negative integer id."
        )
    return vocab


def _read_merges(file: Path) -> list[tuple[str, str]]:
    if not file.exists():
        raise FileNotFoundError(
            f"{file} is missing: a CLIP tokenizer needs merges.txt beside vocab.json."
        )
    merges = []
    for n, line in enumerate(file.read_text(encoding="utf-8").split("\n"), 1):
        if (n == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{file} line {n}: expected two space-separated symbols per merge, got {line!r}."
            )
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(
    file: Path,
) -> tuple[dict[str, int], list[tuple[str, str]], list[tuple[str, bool]]]:
    data = _read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise ValueError(
            f"{file}: expected a `model` of type BPE (a CLIP tokenizer), got {str(model)[:80]!r}."
        )
    if model.get("end_of_word_suffix") != "</w>" or model.get("continuing_subword_prefix") not in (
        None,
        "",
    ):
        raise ValueError(
            f"{file}: not a CLIP BPE model (needs end_of_word_suffix '</w>' and no continuing_subword_prefix)."
        )
    vocab = model.get("vocab")
    if (
        not isinstance(vocab, dict)
        or not vocab
        or not all(isinstance(v, int) for v in vocab.values())
    ):
        raise ValueError(
            f"{file}: model.vocab must be a JSON object mapping each token to an integer id."
        )
    merges = []
    for n, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(s, str) for s in pair)
        ):
            raise ValueError(f"{file}: model.merges[{n}] is {m!r}; expected 'a b' or ['a', 'b'].")
        merges.append((pair[0], pair[1]))
    added = []
    for t in data.get("added_tokens") or []:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise ValueError(
                f"{file}: added_tokens entries must be objects with a 'content' string, got {t!r}."
            )
        unsupported = [k for k in ("lstrip", "rstrip", "single_word") if t.get(k)]
        if unsupported:
            raise ValueError(
                f"{file}: added token {t['content']!r} sets {unsupported}, which is not supported."
            )
        if vocab.get(t["content"], t.get("id")) != t.get("id"):
            raise ValueError(
                f"{file}: added token {t['content']!r} has id {t.get('id')} but the vocab says otherwise."
            )
        vocab.setdefault(t["content"], t["id"])
        added.append((t["content"], bool(t.get("normalized", not t.get("special", False)))))
    return vocab, merges, added


def _token_content(entry: Any, key: str, path: Path) -> str | None:
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    raise ValueError(f"{path}: {key} must be a string or an object with 'content', got {entry!r}.")


def _added_from_configs(entries: dict[str, Any], names: dict[str, str]) -> list[tuple[str, bool]]:
    """Which special tokens transformers matches before normalization (vocab.json layout).

    A token is matched after normalization only if every key naming it is an object with
    `normalized: true` (a plain string means normalized=False); this reproduces
    transformers 5.24 on the SD 1.x and SD 2.x files.
    """
    flags: dict[str, bool] = {}
    for key in _SPECIAL_KEYS:
        entry = entries[key]
        normalized = isinstance(entry, dict) and bool(entry.get("normalized", False))
        flags[names[key]] = flags.get(names[key], True) and normalized
    return list(flags.items())


def _model_max_length(config: dict, path: Path) -> int:
    value = config.get("model_max_length", DEFAULT_MAX_LEN)
    if not isinstance(value, (int, float)) or value < 2 or value > 1_000_000:
        raise ValueError(
            f"{path / 'tokenizer_config.json'}: model_max_length {value!r} is not a usable length; "
            "pass max_len explicitly."
        )
    return int(value)


__all__ = ["BOS_TOKEN", "EOS_TOKEN", "CLIPTokenizer", "bytes_to_unicode"]
