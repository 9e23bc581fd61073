"""Training on several processes: ranks and barriers, FSDP sharding, and sharded (DCP) checkpoints.

A stage runs unchanged under `torchrun --nproc_per_node=N` (the launcher reads `WORLD_SIZE`, `RANK`,
`LOCAL_RANK`); `loire.train` calls in here. Every rank builds the same model (same seed, same growth)
and reads the same global batch, taking rows `rank::world` of each micro-batch, so N ranks compute the
gradient of the same global batch as one process does. Only rank 0 writes checkpoints, logs metrics and
publishes the stage folder; ranks meet at barriers where a folder must exist before another reads it.

- **DDP** (default with WORLD_SIZE > 1): every rank holds the whole model; checkpoints are the
  single-process format (`model.safetensors` + `trainer.pt`, written by rank 0), so a run resumes
  under any number of processes, one included.
- **FSDP** (`fsdp=True`): `torch.distributed.fsdp.fully_shard` on every decoder layer and on the root,
  for models whose weights, gradients and optimizer state do not fit one device. The sharded copy is
  trained; at the end the full weights are gathered (one parameter at a time, to CPU) into the
  caller's model, so the stage folder is an ordinary `save_pretrained` folder. Checkpoints are
  `torch.distributed.checkpoint` folders (model and optimizer state, resharded on load: a run resumes
  under the same or a different world size, one process without FSDP included) plus rank 0's
  `trainer.pt` (scheduler, step, RNG) and the `COMPLETE` marker, written last.

Process-group helpers are no-ops in a single process, so library code can call them unconditionally.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint in every DCP folder


# ----- ranks, barriers -----
def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and logs metrics."""
    return rank() == 0


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched with WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank(), world


def destroy() -> None:
    """Leave the process group (at the end of a command, so torchrun's workers exit cleanly)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; returned as is in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each value (for metrics of the global batch; unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


# ----- FSDP -----
def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model` in place with FSDP2 (`fully_shard`): each decoder layer, then the root (embeddings,
    tied head, final norm). Buffers (λ of scheduled plug-in layers, the hidden mask) stay replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:  # e.g. learned plug-in λ
        raise ValueError(
            f"FSDP cannot shard scalar parameters ({', '.join(scalars[:3])}): use the scheduled plug-in λ policy "
            "or train without --fsdp (DDP)"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    base = getattr(model, "loire_base", None)
    for layer in getattr(base, "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gets the whole state dict on CPU (sharded tensors gathered one at a time)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[name] = value.detach().to("cpu", copy=True)
    return out


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (clip_grad_norm_ of sharded parameters returns a DTensor)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----- sharded checkpoints (torch.distributed.checkpoint) -----
def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_METADATA).is_file()


def save_sharded_checkpoint(
    directory: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, keep: int
) -> Path:
    """A collective: every rank writes its shards to `.tmp-checkpoint-<step>`; rank 0 then adds `trainer.pt`
    and `COMPLETE`, renames it to `checkpoint-<step>` and prunes all but the newest `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from loire.train import complete_checkpoints

    final = directory / f"checkpoint-{step}"
    tmp = directory / f".tmp-checkpoint-{step}"
    if is_main():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    model_state, optim_state = get_state_dict(net, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    barrier()
    if is_main():
        state = {
            "scheduler": scheduler.state_dict(),
            "step": step,
            "world_size": world_size(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(state, tmp / "trainer.pt")
        (tmp / "COMPLETE").write_text(json.dumps({"step": step, "format": "dcp", "world_size": world_size()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_sharded_checkpoint(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Load a DCP checkpoint into `net` (sharded or not: DCP reshards to this world size); returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(net, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["cpu_rng"])
    if trainer["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return int(trainer["step"])
