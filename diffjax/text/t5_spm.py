"""T5's sentencepiece tokenizer, read from a pretrained directory's `spiece.model`.

Token ids equal those of transformers 5.x `T5Tokenizer.from_pretrained(dir)` (the
`tokenizers`-backed Unigram it builds from the same `spiece.model`) with
`padding="max_length", truncation=True, max_length=max_len`:

  * Special tokens written in the text (`<pad>`, `</s>`, `<unk>` and the sentinels
    `<extra_id_0>` .. `<extra_id_{n-1}>`) are cut out first and become their own ids.
  * The rest is normalized with the model's precompiled character map (NFKC and
    more) the way `tokenizers` applies it (`CharsmapNormalizer`: per grapheme
    cluster, which is not quite what sentencepiece itself does), split into words at
    Unicode whitespace, each word gets a leading `▁`, and sentencepiece's unigram
    model (with its own normalizer switched off) segments each word.
  * Sentinel `<extra_id_i>` has id `sp_size + extra_ids - 1 - i` (T5 v1.1: `<extra_id_0>`
    = 32099); `extra_ids` comes from tokenizer_config.json (default 100).
  * `</s>` (id 1) ends every row; longer texts keep their first `max_len - 1` tokens;
    padding is `<pad>` (id 0). The mask is True on the tokens and `</s>`.

Known difference (not met in real captions): transformers' unigram vocabulary also holds
the special tokens, so text that only *normalizes* to one (a full-width `＜pad＞`) becomes
that id there and ordinary pieces here.

Needs the `sentencepiece` package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import regex

from diffjax.text.base import check_texts

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
DEFAULT_MAX_LEN = 512
DEFAULT_EXTRA_IDS = 100
_SENTINEL = re.compile(r"<extra_id_(\d+)>")
# Unicode White_Space (Rust's char::is_whitespace, what transformers' WhitespaceSplit splits on).
_WHITESPACE = re.compile(
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _proto_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Protocol-buffer wire format -> [(field number, wire type, value)] (one level deep)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf field")
        out.append((field, wire, value))
    return out


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _put_field(field: int, wire: int, value: Any) -> bytes:
    key = _put_varint(field << 3 | wire)
    if wire == 0:
        return key + _put_varint(value)
    if wire == 2:
        return key + _put_varint(len(value)) + bytes(value)
    return key + bytes(value)  # fixed 64 / 32-bit


def split_normalizer(model_proto: bytes) -> tuple[bytes, bytes]:
    """A sentencepiece ModelProto -> (its precompiled charsmap, the same model with an identity
    normalizer that still adds the leading "▁" and keeps whitespace as is).

    transformers normalizes with the charsmap itself (see `CharsmapNormalizer`) and runs the
    unigram model on the result; the identity model lets sentencepiece do only the latter.
    """
    charsmap, rebuilt = b"", bytearray()
    for field, wire, value in _proto_fields(model_proto):
        if field == 3 and wire == 2:  # ModelProto.normalizer_spec
            for f, w, v in _proto_fields(value):
                if f == 2 and w == 2:  # NormalizerSpec.precompiled_charsmap
                    charsmap = bytes(v)
            continue
        rebuilt += _put_field(field, wire, value)
    identity = (
        _put_field(1, 2, b"identity")  # name
        + _put_field(3, 0, 1)  # add_dummy_prefix
        + _put_field(4, 0, 0)  # remove_extra_whitespaces
        + _put_field(5, 0, 1)  # escape_whitespaces
    )
    return charsmap, bytes(rebuilt + _put_field(3, 2, identity))


class CharsmapNormalizer:
    """sentencepiece's precompiled character map applied the way `tokenizers`' `Precompiled`
    normalizer (used by transformers) applies it: per extended grapheme cluster; a cluster
    shorter than 6 UTF-8 bytes is replaced whole by the mapping of its *shortest* mapped
    prefix, other clusters character by character.

    The map is a darts-clone double-array trie (uint32 units) followed by the
    NUL-terminated replacement strings.
    """

    def __init__(self, charsmap: bytes):
        if len(charsmap) < 4:
            raise ValueError("precompiled charsmap is too short")
        trie_size = int.from_bytes(charsmap[:4], "little")
        if trie_size % 4 or 4 + trie_size > len(charsmap):
            raise ValueError("precompiled charsmap has an inconsistent trie size")
        self.units = np.frombuffer(charsmap[4 : 4 + trie_size], dtype="<u4").tolist()
        self.strings = charsmap[4 + trie_size :]
        self._cache: dict[str, str | None] = {}

    def transform(self, chunk: str) -> str | None:
        """Replacement of `chunk`'s shortest mapped prefix (None if no prefix is mapped)."""
        if chunk in self._cache:
            return self._cache[chunk]
        units, found = self.units, None
        pos = units[0] >> 10 << ((units[0] & (1 << 9)) >> 6) if units else 0
        for c in chunk.encode("utf-8"):
            pos ^= c
            if pos >= len(units):
                break
            unit = units[pos]
            if unit & ((1 << 31) | 0xFF) != c:
                break
            pos ^= unit >> 10 << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                start = units[pos] & ((1 << 31) - 1)
                end = self.strings.find(b"\0", start)
                found = self.strings[start : end if end >= 0 else len(self.strings)].decode(
                    "utf-8", "replace"
                )
                break
        if len(self._cache) < 100_000:
            self._cache[chunk] = found
        return found

    def __call__(self, text: str) -> str:
        out = []
        for grapheme in regex.findall(r"\X", text):
            if len(grapheme.encode("utf-8")) < 6:
                norm = self.transform(grapheme)
                if norm is not None:
                    out.append(norm)
                    continue
            for c in grapheme:
                norm = self.transform(c)
                out.append(c if norm is None else norm)
        return "".join(out)


def _load_sentencepiece(file: Path) -> Any:
    try:
        import sentencepiece
    except ImportError:
        raise ImportError(
            "The T5 tokenizer needs the `sentencepiece` package: pip install sentencepiece."
        ) from None
    if not file.exists():
        raise FileNotFoundError(
            f"{file} is missing: a T5 tokenizer directory needs its sentencepiece spiece.model."
        )
    sp = sentencepiece.SentencePieceProcessor()
    try:
        charsmap, identity_model = split_normalizer(file.read_bytes())
        sp.LoadFromSerializedProto(identity_model)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad proto
        raise ValueError(f"{file} is not a valid sentencepiece model ({e}).") from None
    return sp, charsmap


class T5Tokenizer:
    """T5 sentencepiece: captions -> (ids int32 [B, max_len], mask bool [B, max_len]).

    Args:
      processor: a loaded `sentencepiece.SentencePieceProcessor` (T5 layout: <pad>=0,
        </s>=1, <unk>=2) whose own normalizer is the identity (`split_normalizer`).
      charsmap: the model's precompiled character map, applied before it (b"": none).
      max_len: L (SD3 uses 256, Flux 256 or 512, transformers' default 512).
      extra_ids: number of `<extra_id_i>` sentinels after the sentencepiece vocabulary.
    """

    def __init__(
        self,
        processor: Any,
        *,
        charsmap: bytes = b"",
        max_len: int = DEFAULT_MAX_LEN,
        extra_ids: int = DEFAULT_EXTRA_IDS,
    ):
        if int(max_len) < 1:
            raise ValueError(f"max_len must be >= 1 (room for </s>), got {max_len}.")
        if int(extra_ids) < 0:
            raise ValueError(f"extra_ids must be >= 0, got {extra_ids}.")
        self.sp = processor
        self.max_len = int(max_len)
        self.extra_ids = int(extra_ids)
        self.sp_size = int(processor.get_piece_size())
        expected = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
        got = {t: int(processor.piece_to_id(t)) for t in expected}
        if got != expected or processor.unk_id() != 2:
            raise ValueError(
                f"not a T5 sentencepiece model: expected <pad>=0, </s>=1, <unk>=2, got {got} (unk_id "
                f"{processor.unk_id()})."
            )
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.normalizer = CharsmapNormalizer(charsmap) if charsmap else None
        self.space_id = int(processor.piece_to_id("\u2581"))
        if processor.id_to_piece(self.space_id) != "\u2581":
            self.space_id = self.unk_id
        self.vocab_size = self.sp_size + self.extra_ids
        self.special = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
        for i in range(self.extra_ids):
            self.special[f"<extra_id_{i}>"] = self.sentinel_id(i)
        ordered = sorted(self.special, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in ordered))

    def sentinel_id(self, i: int) -> int:
        """Id of `<extra_id_i>` (they are numbered downwards from the end of the vocabulary)."""
        if not 0 <= i < self.extra_ids:
            raise ValueError(f"<extra_id_{i}> does not exist (extra_ids={self.extra_ids}).")
        return self.sp_size + self.extra_ids - 1 - i

    def tokens(self, text: str) -> list[int]:
        """One caption -> its token ids, without </s>, padding or truncation."""
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._encode_piece(text[start : m.start()]))
            ids.append(self.special[m.group()])
            start = m.end()
        ids.extend(self._encode_piece(text[start:]))
        return ids

    def _encode_piece(self, text: str) -> list[int]:
        """Text without special tokens -> ids, as transformers' pipeline does: the precompiled
        character map, words split at Unicode whitespace, `▁` put before each word, words cut
        again before every `▁`, each chunk segmented by the unigram model."""
        if self.normalizer is not None:
            text = self.normalizer(text)
        ids: list[int] = []
        for word in _WHITESPACE.split(text):
            if not word:
                continue
            if not word.startswith("\u2581"):
                word = "\u2581" + word
            for chunk in word.split("\u2581")[1:]:
                # "▁" + chunk: the identity model puts the "▁" back itself (its dummy prefix).
                ids.extend(self.sp.encode(chunk) if chunk else [self.space_id])
        return ids

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (ids [B, max_len] int32, mask [B, max_len] bool), </s> appended."""
        texts = check_texts(texts)
        ids = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.max_len), bool)
        for i, text in enumerate(texts):
            row = [*self.tokens(text)[: self.max_len - 1], self.eos_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask

    def __repr__(self) -> str:
        return f"T5Tokenizer(max_len={self.max_len}, vocab_size={self.vocab_size}, extra_ids={self.extra_ids})"

    @classmethod
    def from_dir(cls, path: str | Path, max_len: int | None = None) -> T5Tokenizer:
        """A pretrained T5 tokenizer folder (`spiece.model`, optional `tokenizer_config.json`)
        -> T5Tokenizer; `max_len` defaults to the config's `model_max_length` (else 512)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"T5 tokenizer directory {str(path)!r} does not exist.")
        spiece = path / "spiece.model"
        if not spiece.exists() and (path / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{spiece} is missing: T5 tokenizers are read from spiece.model (a tokenizer.json alone is not "
                "supported); copy spiece.model from the original repository into the folder."
            )
        config = _read_config(path / "tokenizer_config.json")
        extra_ids = config.get("extra_ids", DEFAULT_EXTRA_IDS)
        if not isinstance(extra_ids, int) or extra_ids < 0:
            raise ValueError(
                f"{path / 'tokenizer_config.json'}: extra_ids must be an integer >= 0, got {extra_ids!r}."
            )
        extras = config.get("additional_special_tokens") or []
        others = [
            t
            for t in extras
            if not _SENTINEL.fullmatch(t if isinstance(t, str) else str(t.get("content")))
        ]
        if others:
            raise ValueError(
                f"{path / 'tokenizer_config.json'}: additional_special_tokens {others[:5]} are not <extra_id_N> "
                "sentinels; only T5's sentinels are supported."
            )
        if extras and not config.get("extra_ids"):
            extra_ids = len(extras)
        for key, want in (
            ("pad_token", PAD_TOKEN),
            ("eos_token", EOS_TOKEN),
            ("unk_token", UNK_TOKEN),
        ):
            value = config.get(key, want)
            value = value.get("content") if isinstance(value, dict) else value
            if value != want:
                raise ValueError(
                    f"{path / 'tokenizer_config.json'}: {key} is {value!r}; T5 uses {want!r}."
                )
        if max_len is None:
            max_len = config.get("model_max_length", DEFAULT_MAX_LEN)
            if not isinstance(max_len, (int, float)) or not 1 <= max_len <= 1_000_000:
                raise ValueError(
                    f"{path / 'tokenizer_config.json'}: model_max_length {max_len!r} is not a usable length; "
                    "pass max_len explicitly (e.g. 256 or 512)."
                )
        try:
            sp, charsmap = _load_sentencepiece(spiece)
            tok = cls(sp, charsmap=charsmap, max_len=int(max_len), extra_ids=extra_ids)
        except ValueError as e:
            raise ValueError(f"{spiece}: {e}") from None
        decoder = config.get("added_tokens_decoder") or {}
        for key, entry in decoder.items():
            content = entry.get("content") if isinstance(entry, dict) else entry
            if tok.special.get(content) != int(key):
                raise ValueError(
                    f"{path / 'tokenizer_config.json'}: added_tokens_decoder gives {content!r} id {key}, but "
                    f"spiece.model with extra_ids={extra_ids} gives {tok.special.get(content)}."
                )
        return tok


def _read_config(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object.")
    return config


__all__ = ["T5Tokenizer"]
