"""Byte-level BPE tokenizers trained on the domain corpora, wrapped as Hugging Face fast tokenizers.

Byte-level means the base vocabulary is the 256 bytes (ByteLevel pre-tokenizer and decoder, as in
GPT-2), so any later text, from any domain or script, encodes without unknown tokens and decodes
back to exactly the same string. `<|endoftext|>` is both eos and bos (GPT-2 style) and separates
packed documents; `<pad>` and `<mask>` serve padding and masked-LM heads. `DOMAIN_TOKENS` are reserved
as special tokens from the start, so domain prompts (ELLE) never need a vocabulary change.

A saved tokenizer is the usual pair `tokenizer.json` + `tokenizer_config.json` and loads with
`load_tokenizer` or `transformers.AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from loire.domains import DOMAINS

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN)
DOMAIN_TOKENS = tuple(f"<{domain}>" for domain in DOMAINS)
# Special tokens take the first ids, in this order: <|endoftext|>=0, <pad>=1, <mask>=2, <WB>=3, ...
_ALL_SPECIAL = SPECIAL_TOKENS + DOMAIN_TOKENS
_BYTES = 256


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,  # never produced by a byte-level model; set so code that asks finds one
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        extra_special_tokens=list(DOMAIN_TOKENS),
        # The default cleanup rewrites " ." as "." and breaks the exact decode of tokenized corpora.
        clean_up_tokenization_spaces=False,
    )


def byte_level_bpe(texts: Iterable[str], vocab_size: int, specials: list[str], min_frequency: int = 0) -> Tokenizer:
    """The byte-level BPE backend (GPT-2's scheme) trained on `texts`, with `specials` first in its vocabulary."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        # Every byte is in the vocabulary even if the training texts never show it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; the same texts give the same tokenizer.

    `vocab_size` counts the special tokens and the 256 byte tokens; training may stop below it when
    the texts offer no more merges seen `min_frequency` times.
    """
    floor = _BYTES + len(_ALL_SPECIAL)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size!r} must be an int >= {floor} (256 bytes + {len(_ALL_SPECIAL)} specials)"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} must be an int >= 1")
    tokenizer = _wrap(byte_level_bpe(texts, vocab_size, list(_ALL_SPECIAL), min_frequency))
    logger.info("trained a byte-level BPE tokenizer with %d tokens", len(tokenizer))
    return tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with `save_pretrained` (a folder) or a bare `tokenizer.json` file.

    Raises ValueError naming the file when `tokenizer.json` is missing or does not parse. A bare
    tokenizer.json (no tokenizer_config.json) gets the special tokens of this module where its
    vocabulary holds them.
    """
    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{file}: no such file (save a tokenizer with tokenizer.save_pretrained(folder))")
    try:
        raw = file.read_text(encoding="utf-8")
        json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a valid JSON file ({exc})") from None
    try:
        backend = Tokenizer.from_str(raw)
    except Exception as exc:  # the tokenizers library raises bare Exceptions with long serde messages
        raise ValueError(f"{file}: not a tokenizer.json the tokenizers library can read ({exc})") from None

    config = file.parent / "tokenizer_config.json"
    if file.name == "tokenizer.json" and config.is_file():
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(file.parent))
        except Exception as exc:
            raise ValueError(f"{config}: cannot load the tokenizer folder ({exc})") from None
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
        vocab = tokenizer.get_vocab()
        defaults = {
            "bos_token": EOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "mask_token": MASK_TOKEN,
        }
        tokenizer.add_special_tokens({k: v for k, v in defaults.items() if v in vocab})
    return tokenizer
