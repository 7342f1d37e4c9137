"""Tokenizers (diffjax.text): fixed ids, padding, the null caption, the registry."""

import sys

import numpy as np
import pytest

from diffjax.text import (
    PAD_ID,
    TOKENIZERS,
    ByteTokenizer,
    WordTokenizer,
    check_texts,
    make_tokenizer,
    pad,
)


def test_word_tokenizer_is_stable_and_deterministic():
    tok = WordTokenizer(max_len=6)
    ids, mask = tok.encode(["a handwritten seven", "A Handwritten  SEVEN!", ""])
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (3, 6)
    np.testing.assert_array_equal(ids[0], ids[1])  # case and punctuation do not matter
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0, 0])
    assert not mask[2].any()  # the empty caption is the null caption
    # CRC-32 buckets: these ids are fixed forever (a changed id would silently
    # break every trained text model).
    assert ids[0, 0] == 1 + 0xE8B7BE43 % 4096  # crc32(b"a") = 0xE8B7BE43
    assert ids[0, :3].tolist() == [3652, 3586, 3437]
    seven, three = tok.encode(["a handwritten seven", "a handwritten three"])[0]
    assert seven[2] != three[2]
    assert tok.vocab_size == 4097
    long_ids, long_mask = tok.encode(["one two three four five six seven eight"])
    assert long_mask.all() and long_ids.shape == (1, 6)  # truncated


def test_byte_tokenizer_roundtrip():
    tok = make_tokenizer("byte", 24)
    ids, mask = tok.encode(["a handwritten seven", "ß"])
    assert tok.decode(ids) == ["a handwritten seven", "ß"]
    assert mask.sum(1).tolist() == [19, 2]
    with pytest.raises(TypeError, match="list of captions"):
        tok.encode("a handwritten seven")
    with pytest.raises(ValueError, match="Unknown tokenizer"):
        make_tokenizer("bpe", 8)
    assert isinstance(tok, ByteTokenizer)


def test_registry_and_shared_helpers():
    assert TOKENIZERS["word"] is WordTokenizer and TOKENIZERS["byte"] is ByteTokenizer
    assert {"clip", "t5"} <= set(TOKENIZERS)  # read from a pretrained directory's files
    assert make_tokenizer("word", 4, num_buckets=7).vocab_size == 8
    ids, mask = pad([[5, 6, 7], [], [9]], 2)
    np.testing.assert_array_equal(ids, [[5, 6], [PAD_ID, PAD_ID], [9, PAD_ID]])
    np.testing.assert_array_equal(mask, ids != PAD_ID)
    assert ids.dtype == np.int32 and mask.dtype == bool
    with pytest.raises(TypeError, match="must be strings"):
        check_texts(["ok", 3])
    with pytest.raises(ValueError, match="> 0"):
        WordTokenizer(0)


def test_tokenizing_imports_no_model_code():
    # The data pipeline tokenizes captions through this package, so it must stay
    # free of Flax / JAX (checked in a fresh interpreter: this one has them loaded).
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    code = (
        "import sys, diffjax.text; "
        "print(sorted(m for m in ('flax', 'jax', 'diffjax.models') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"
