"""Byte-level BPE tokenizer: training, special tokens, lossless coverage, save/load (loire.tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loire.tokenizer import DOMAIN_TOKENS, SPECIAL_TOKENS, load_tokenizer, train_tokenizer

TEXTS = [
    "The model grows from one domain to the next without forgetting .",
    "Function-preserving growth keeps the logits unchanged , exactly .",
    "Reviews : the battery life of this player is great , the screen is not .",
    "Protein kinase inhibitors reduce tumour growth in mice .",
    "We propose a graph neural network for parsing scientific abstracts .",
] * 20

AWKWARD = [
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文文本，没有空格。日本語のテキスト",
    "control \x00\x01\x07\x1b[31m\x7f chars\ttab\r\nCRLF",
    "  leading and trailing spaces  ",
    "zero\u200bwidth and combining é (e\u0301)",
    "",
    "\ufeffBOM and lone \U0010ffff plane-16",
]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train_tokenizer(TEXTS, vocab_size=400)


def test_special_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<pad>", "<mask>")
    assert DOMAIN_TOKENS == ("<WB>", "<NEWS>", "<REV>", "<BIO>", "<CS>")
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 1, 2)
    assert [tokenizer.convert_tokens_to_ids(t) for t in DOMAIN_TOKENS] == [3, 4, 5, 6, 7]
    for token in (*SPECIAL_TOKENS, *DOMAIN_TOKENS):
        assert token in tokenizer.all_special_tokens
        # A special token in text is one token, never split into bytes.
        assert (
            tokenizer(f"x {token} y", add_special_tokens=False)["input_ids"].count(
                tokenizer.convert_tokens_to_ids(token)
            )
            == 1
        )
    assert len(tokenizer) <= 400
    assert tokenizer.is_fast


def test_training_is_deterministic() -> None:
    a = train_tokenizer(TEXTS, vocab_size=300)
    b = train_tokenizer(iter(TEXTS), vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.get_vocab() == b.get_vocab()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(TEXTS, min_frequency=0)


def test_byte_level_coverage_is_lossless(tokenizer) -> None:  # type: ignore[no-untyped-def]
    unk = tokenizer.unk_token_id
    for text in [*AWKWARD, *TEXTS[:5]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids or "<|endoftext|>" in text
        assert tokenizer.decode(ids) == text, repr(text)
    # Merges learned on the training text make it shorter than its bytes.
    sample = TEXTS[0]
    assert len(tokenizer(sample)["input_ids"]) < len(sample.encode("utf-8")) / 2


def test_save_round_trip(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tokenizer.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id, loaded.mask_token_id) == (0, 0, 1, 2)
        assert set(DOMAIN_TOKENS) <= set(loaded.all_special_tokens)
        for text in AWKWARD:
            ids = loaded(text, add_special_tokens=False)["input_ids"]
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
            assert loaded.decode(ids) == text
    # A bare tokenizer.json still gets the special tokens.
    bare = load_tokenizer(tmp_path / "tokenizer.json")
    assert (bare.eos_token_id, bare.pad_token_id, bare.mask_token_id) == (0, 1, 2)
    assert bare.decode(bare(AWKWARD[0])["input_ids"]) == AWKWARD[0]


def test_load_errors_name_the_file(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"tokenizer\.json: no such file") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="not a valid JSON file") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__

    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="tokenizers library can read") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)

    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ValueError, match="not a valid JSON file"):
        load_tokenizer(tmp_path)
