"""Tokenizers read from pretrained directories (CLIP BPE, T5 sentencepiece) give transformers' ids.

The fixture folders hold a small real CLIP BPE (OpenAI's first 2000 merges) in three
layouts and a small T5 sentencepiece model, each with `reference.json`: transformers
5.24's ids and masks for the same prompts (`tests/fixtures/make_tokenizers.py`).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffjax.text import TOKENIZERS, CLIPTokenizer, T5Tokenizer, make_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
CLIP_DIRS = ["clip_tokenizer", "clip_tokenizer_json", "clip_tokenizer_sd2"]


def _reference(name):
    return json.loads((FIXTURES / name / "reference.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", [*CLIP_DIRS, "t5_tokenizer"])
def test_ids_and_masks_equal_transformers(name):
    ref = _reference(name)
    kind = "t5" if name.startswith("t5") else "clip"
    tok = make_tokenizer(kind, ref["max_length"], path=FIXTURES / name)
    ids, mask = tok.encode(ref["prompts"])
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.shape == mask.shape == (len(ref["prompts"]), ref["max_length"])
    for i, prompt in enumerate(ref["prompts"]):
        assert ids[i].tolist() == ref["input_ids"][i], f"{name}: ids differ for {prompt!r}"
        assert mask[i].astype(int).tolist() == ref["attention_mask"][i], (
            f"{name}: mask differs for {prompt!r}"
        )


def test_clip_layouts_and_special_tokens():
    sd1 = CLIPTokenizer.from_dir(FIXTURES / "clip_tokenizer")
    via_json = CLIPTokenizer.from_dir(FIXTURES / "clip_tokenizer_json")
    sd2 = CLIPTokenizer.from_dir(FIXTURES / "clip_tokenizer_sd2")
    assert sd1.max_len == via_json.max_len == sd2.max_len == 77  # model_max_length
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id) == (2512, 2513, 2513)
    assert (sd2.bos_id, sd2.eos_id, sd2.pad_id) == (2512, 2513, 0)
    assert sd1.vocab_size == via_json.vocab_size == 2514
    ids, mask = sd1.encode(["", "a photo of a cat"])
    assert ids[0, :3].tolist() == [2512, 2513, 2513] and mask[0].sum() == 2  # "" is BOS EOS
    assert ids[1, :7].tolist() == [2512, 320, 1125, 539, 320, 2368, 2513]  # the real CLIP ids
    long_ids, long_mask = sd1.encode(["cat " * 100])
    assert long_mask.all() and long_ids[0, -1] == sd1.eos_id  # truncated, EOS kept
    assert isinstance(make_tokenizer("clip", None, path=FIXTURES / "clip_tokenizer"), CLIPTokenizer)


def test_t5_sentinels_and_lengths():
    tok = T5Tokenizer.from_dir(FIXTURES / "t5_tokenizer")
    assert tok.max_len == 512 and (tok.pad_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size == tok.sp_size + 100
    assert tok.sentinel_id(0) == tok.vocab_size - 1 and tok.sentinel_id(99) == tok.sp_size
    short = T5Tokenizer.from_dir(FIXTURES / "t5_tokenizer", max_len=4)
    ids, mask = short.encode(["", "a photo of a cat at night"])
    assert ids[0].tolist() == [1, 0, 0, 0] and mask[0].tolist() == [True, False, False, False]
    assert ids[1, -1] == 1 and mask[1].all()


def test_registry_and_bad_arguments():
    assert TOKENIZERS["clip"] is CLIPTokenizer and TOKENIZERS["t5"] is T5Tokenizer
    with pytest.raises(ValueError, match="path="):
        make_tokenizer("clip", 77)
    with pytest.raises(TypeError, match="only path and max_len"):
        make_tokenizer("t5", 32, path=FIXTURES / "t5_tokenizer", extra_ids=3)
    with pytest.raises(TypeError, match="list of captions"):
        CLIPTokenizer.from_dir(FIXTURES / "clip_tokenizer").encode("a cat")


def _copy(name, tmp_path):
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    return out


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_dir(tmp_path / "nowhere")
    clip = _copy("clip_tokenizer", tmp_path)
    (clip / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"merges\.txt is missing"):
        CLIPTokenizer.from_dir(clip)
    (clip / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.json \+ merges\.txt.*tokenizer\.json"):
        CLIPTokenizer.from_dir(clip)
    t5 = _copy("t5_tokenizer", tmp_path)
    (t5 / "spiece.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"spiece\.model is missing"):
        T5Tokenizer.from_dir(t5)


def test_corrupted_files_are_named(tmp_path):
    clip = _copy("clip_tokenizer", tmp_path)
    (clip / "vocab.json").write_text('{"a": 0, "b": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json is not valid JSON"):
        CLIPTokenizer.from_dir(clip)
    (clip / "vocab.json").write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json must be a JSON object mapping each token"):
        CLIPTokenizer.from_dir(clip)
    (clip / "vocab.json").write_text(
        '{"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}', encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"clip_tokenizer: merge 0 .* not in the vocabulary"):
        CLIPTokenizer.from_dir(clip)
    js = _copy("clip_tokenizer_json", tmp_path)
    data = json.loads((js / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"][3] = "only-one-symbol"
    (js / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json: model\.merges\[3\]"):
        CLIPTokenizer.from_dir(js)
    t5 = _copy("t5_tokenizer", tmp_path)
    (t5 / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"spiece\.model is not a valid sentencepiece model"):
        T5Tokenizer.from_dir(t5)
    (t5 / "spiece.model").unlink()
    shutil.copy(FIXTURES / "t5_tokenizer" / "spiece.model", t5 / "spiece.model")
    (t5 / "tokenizer_config.json").write_text('{"model_max_length": 1e30}', encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json: model_max_length .* pass max_len"
    ):
        T5Tokenizer.from_dir(t5)
