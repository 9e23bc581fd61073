"""An existing Hugging Face checkpoint as the start of a lifelong chain (stage 0).

`import_base` reads a local GPT-2, BERT or Llama folder (config.json, safetensors weights, the model's
own tokenizer), converts it exactly (`loire.convert.from_hf`) and writes a *stage-0 folder*: the Loire
model, the base's tokenizer and a `stage.json` with `stage: 0`, no domain and no lineage, and `base` =
{source, sha256 of the weights, architecture}. `loire.lifelong.run_stage` continues from it like from any
parent stage folder (its tokenizer is kept: no new BPE), and every later stage's `stage.json` carries the
`base` entry. The base is not a distillation teacher: teachers are the models of earlier *domains*.

Refused with a one-line ValueError (exit 2 in the CLI): a folder without config.json, pickle-only
weights, an architecture other than GPT2LMHeadModel / BertForMaskedLM / LlamaForCausalLM, a missing or
slow-only tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from loire.io import check_hf_folder, publish_stage_folder
from loire.model import model_dims

logger = logging.getLogger(__name__)

# The HF classes a chain can start from: one LM head per family, so the base can be trained on text.
BASE_ARCHITECTURES: tuple[str, ...] = ("GPT2LMHeadModel", "BertForMaskedLM", "LlamaForCausalLM")
# Files any of which makes a tokenizer the base brings along (fast tokenizer.json, or the slow files a
# fast tokenizer is converted from).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")
# The import is checked on a seeded random probe: 2 sequences of 16 tokens.
_PROBE_SHAPE = (2, 16)
_HASH_CHUNK = 1 << 20


def weights_sha256(folder: str | os.PathLike[str]) -> str:
    """sha256 over the folder's safetensors files, in name order (the identity of a base's weights)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def check_base(src: str | os.PathLike[str]) -> str:
    """Check a base folder before anything is loaded; returns its architecture (a one-line ValueError if not)."""
    check_hf_folder(src)
    folder = Path(src)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder}/config.json: not valid JSON ({exc})") from None
    names = config.get("architectures") or []
    if not names or names[0] not in BASE_ARCHITECTURES:
        raise ValueError(
            f"{folder}/config.json: architectures={names} cannot start a lifelong chain; "
            f"supported: {', '.join(BASE_ARCHITECTURES)}"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{folder}: no tokenizer ({', '.join(_TOKENIZER_FILES)}); a base model keeps its own tokenizer, "
            "save it beside the weights with tokenizer.save_pretrained"
        )
    return names[0]


def load_base_tokenizer(src: str | os.PathLike[str]):
    """The base's own (fast) tokenizer; BERT's [SEP] doubles as the end-of-document token for packing."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise ValueError(f"{src}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{src}: the tokenizer is not a fast tokenizer (tokenizer.json); convert and save it")
    if tok.eos_token is None:
        separator = tok.sep_token
        if separator is None:
            raise ValueError(f"{src}: the tokenizer has neither an eos nor a sep token to separate documents")
        tok.eos_token = separator
    return tok


def import_base(source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, uri: str | None = None) -> dict:
    """Convert the base at `source` into a stage-0 folder at `out_dir`; returns its `stage.json` record.

    `uri` (default: `source`) is what the record names as the base's source, e.g. the s3:// prefix a
    pipeline downloaded. The folder appears complete or not at all.
    """
    import transformers

    from loire.convert import from_hf
    from loire.lifelong import FORMAT_VERSION, STAGE_FILE
    from loire.metrics import max_abs_logit_diff

    architecture = check_base(source)
    tok = load_base_tokenizer(source)
    try:
        hf_model = getattr(transformers, architecture).from_pretrained(str(source), use_safetensors=True)
    except Exception as exc:
        raise ValueError(f"{source}: cannot load the {architecture} weights ({type(exc).__name__}: {exc})") from None
    hf_model.eval()
    model = from_hf(hf_model).eval()
    vocab = min(model.config.vocab_size, len(tok))
    probe = torch.randint(0, vocab, _PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    diff = max_abs_logit_diff(hf_model, model, probe)
    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "stage": 0,
        "domain": None,
        "strategy": None,
        "base": {
            "source": str(uri or source),
            "sha256": weights_sha256(source),
            "architecture": architecture,
            "import_max_abs_logit_diff": diff,
        },
        "parent": None,
        "lineage": [],
        "growth": {"targets": {}, "operator": "import", "init": None, "max_abs_logit_diff": diff},
        "dims": model_dims(model),
        "distill": None,
        "ppl": {},
        "ppl_matrix": [],
        "ap": None,
        "ap_plus": None,
        "flops": {"stage": 0.0, "teachers": 0.0, "cumulative": 0.0},
        "wall_time_s": 0.0,
        "train": None,
    }
    out = Path(out_dir)
    publish_stage_folder(model, tok, record, out, STAGE_FILE)
    logger.info("imported base %s (%s) as stage 0 at %s; max |Δlogits| %.3g", source, architecture, out, diff)
    return record


__all__ = ["BASE_ARCHITECTURES", "check_base", "import_base", "load_base_tokenizer", "weights_sha256"]
