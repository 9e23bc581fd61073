"""Small Hugging Face checkpoints of each family, built locally (random weights, a tokenizer trained on a
little real text) and saved with `save_pretrained`, as a team's GPT-2 / BERT / Llama folder would be.
Nothing comes from the hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from loire.tokenizer import byte_level_bpe
from tests.conftest import DATA_ROOT

BASE_FAMILIES = ("gpt2", "bert", "llama")
TEXT_FILE = DATA_ROOT / "corpora" / "wb" / "wikitext2_valid.jsonl"
_VOCAB = 400
_DIMS = dict(hidden=32, heads=2, layers=2, ffn=64, positions=128)
# The wrong-format bases `make_bad_base` builds, each with the words of the one-line refusal (loire.base).
BAD_BASES = {
    "pickle": "pickle checkpoints are refused",
    "architecture": "cannot start a lifelong chain",
    "tokenizer": "no tokenizer",
}


def sample_texts(limit: int = 1500) -> list[str]:
    """A little real text (WikiText-2 validation lines) to train the tokenizers on."""
    texts = []
    with TEXT_FILE.open(encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line).get("text", "").strip()
            if text:
                texts.append(text)
            if len(texts) >= limit:
                break
    return texts


def _byte_bpe(specials: list[str]) -> Tokenizer:
    return byte_level_bpe(sample_texts(), _VOCAB, specials)


def _wordpiece() -> Tokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=_VOCAB, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(sample_texts(), trainer=trainer)
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return backend


def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    if family == "gpt2":
        backend = _byte_bpe(["<|endoftext|>"])
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
        )
    if family == "bert":
        return PreTrainedTokenizerFast(
            tokenizer_object=_wordpiece(),
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    if family == "llama":
        backend = _byte_bpe(["<unk>", "<s>", "</s>"])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    raise ValueError(family)


def make_model(family: str, tok: PreTrainedTokenizerFast, seed: int = 0):
    torch.manual_seed(seed)
    h, n, layers, ffn, pos = (_DIMS[k] for k in ("hidden", "heads", "layers", "ffn", "positions"))
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok), n_positions=pos, n_embd=h, n_layer=layers, n_head=n, n_inner=ffn,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    if family == "bert":
        config = BertConfig(
            vocab_size=len(tok), hidden_size=h, num_hidden_layers=layers, num_attention_heads=n,
            intermediate_size=ffn, max_position_embeddings=pos, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        return BertForMaskedLM(config)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=h, num_hidden_layers=layers, num_attention_heads=n, num_key_value_heads=n,
        intermediate_size=ffn, max_position_embeddings=pos, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def make_base(family: str, folder: Path, seed: int = 0) -> Path:
    """A saved HF checkpoint folder of `family` (safetensors weights + its tokenizer)."""
    tok = make_tokenizer(family)
    model = make_model(family, tok, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_bad_base(case: str, good: Path, folder: Path) -> Path:
    """A copy of the base `good` made wrong in one way (a key of `BAD_BASES`)."""
    folder.mkdir()
    for f in good.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if case == "pickle":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif case == "architecture":
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["GPT2ForSequenceClassification"]
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    return folder
