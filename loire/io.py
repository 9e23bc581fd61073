"""Loading and saving Loire model folders (save_pretrained layout), safely and atomically."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loire.config import LoireConfig
from loire.model import (
    LoireForCausalLM,
    LoireForMaskedLM,
    LoireForSequenceClassification,
    LoireModel,
    LoirePreTrainedModel,
)

logger = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type[LoirePreTrainedModel]] = {
    cls.__name__: cls for cls in (LoireModel, LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification)
}
# Files a tokenizer may consist of; copied along with a model when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)


# transformers' `from_pretrained` builds models under process-wide patches (default dtype, init
# functions, meta-device creation ops), so a model built in another thread meanwhile can come out
# wrong (meta tensors). Prefect runs tasks in threads: every model construction here holds this lock.
MODEL_INIT_LOCK = threading.RLock()


def load_model(path: str | os.PathLike[str]) -> LoirePreTrainedModel:
    """Load a Loire model folder; only safetensors weights are accepted (no pickle)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        found = f" (found {pickles}: pickle weights are refused)" if pickles else ""
        raise ValueError(f"{folder}: no .safetensors weights{found}")
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights)
    config = LoireConfig.from_pretrained(folder)
    names = config.architectures or ["LoireForCausalLM"]
    if names[0] not in MODEL_CLASSES:
        raise ValueError(f"{folder}/config.json: architectures={names} is not one of {sorted(MODEL_CLASSES)}")
    with MODEL_INIT_LOCK:
        return MODEL_CLASSES[names[0]].from_pretrained(folder, use_safetensors=True)


def _check_safetensors(path: Path) -> None:
    """Read the header of a safetensors file (no tensor data): a pickle or any other file renamed to
    `.safetensors` is refused here, naming the file, before transformers touches it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None


def copy_tokenizer(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy tokenizer files from `src` to `dst`; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def is_model_folder(path: Path) -> bool:
    """A folder holding a Loire model (its config.json names model_type "loire")."""
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == LoireConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Refuse a destination whose replacement would delete the source or anything that is not a model.

    `dst` is replaced as a whole, so it may not equal or contain `src`, and an existing `dst` must be
    empty or a Loire model folder (a previous output), never a folder of other files.
    """
    source, target = Path(src).resolve(), Path(dst).resolve()
    if target == source or target in source.parents:
        raise ValueError(f"{dst}: the destination equals or contains the source {src}; choose another folder")
    if target.is_file():
        raise ValueError(f"{dst}: is a file, not a folder; refusing to replace it")
    if target.is_dir() and any(target.iterdir()) and not is_model_folder(target):
        raise ValueError(f"{dst}: exists and is not a Loire model folder; refusing to replace what it holds")


def check_hf_folder(src: str | os.PathLike[str]) -> None:
    """A local Hugging Face checkpoint folder with safetensors weights, checked before transformers reads it."""
    folder = Path(src)
    if not folder.exists():
        raise ValueError(f"{src}: no such folder")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(f"{src}: not a Hugging Face model folder (no config.json)")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{src}: no .safetensors weights (pickle checkpoints are refused)")
    for path in weights:
        _check_safetensors(path)


def save_model_atomic(
    model: LoirePreTrainedModel, dst: str | os.PathLike[str], tokenizer_from: str | None = None
) -> Path:
    """save_pretrained into a temporary sibling folder, then swap it in: `dst` is never half-written.

    An existing `dst` is replaced only after the new folder is complete.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, tmp)
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def publish_dir(tmp: Path, dst: Path) -> None:
    """Swap a completed folder `tmp` into `dst`; an existing `dst` is removed only after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)  # put the previous model back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_stage_folder(
    model: Any,
    tokenizer: Any,
    record: dict[str, Any],
    out: Path,
    stage_file: str,
    extra: Mapping[str, Callable[[Path], None]] | None = None,
) -> None:
    """Write model, tokenizer and the stage record into a temporary sibling of `out`, then swap it in.
    `extra` maps more file names to the functions that write them (into the temporary folder)."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, write in (extra or {}).items():
            write(tmp / name)
        (tmp / stage_file).write_text(json.dumps(record, indent=2, default=float))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
