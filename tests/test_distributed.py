"""`loire train-stage` under real `torchrun` subprocesses on CPU (gloo): DDP and FSDP against one process,
a rank SIGKILLed mid-run, and `--resume` (same and different world size).

Tolerance (docs/training.md): the saved weights of N ranks and of one process that trains the same global
batch agree within a relative L2 distance of 1e-5 over all parameters and 1e-5 absolute per element
(measured: 2.4e-7 relative, 1.2e-6 absolute for DDP and FSDP, gpt-tiny, 3 steps). Only the order of
floating-point sums differs (each rank averages its half of the batch, then the ranks average).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loire.lifelong import checkpoint_dir
from loire.synthetic import generate
from loire.train import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
REL_L2, ABS = 1e-5, 1e-5
KILL_STEPS = 16  # checkpoints every 4 steps: the kill lands after the first one, with 12 steps to spare


def _env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _stage_args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "-m",
        "loire.cli",
        "train-stage",
        "--domain",
        "WB",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--preset",
        "gpt-tiny",
        "--steps",
        str(steps),
        "--device",
        "cpu",
        *extra,
    ]


def _single(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, *_stage_args(corpus, out, steps, *extra)]


def _torchrun(corpus: Path, out: Path, steps: int, *extra: str, nproc: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, *_stage_args(corpus, out, steps, *extra)]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def distance(a_dir: Path, b_dir: Path) -> tuple[float, float]:
    """(relative L2 over all parameters, max absolute difference) of two stage folders' weights."""
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5, max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_one_complete_stage(out: Path) -> dict:
    assert (out / "stage.json").is_file() and (out / "model.safetensors").is_file()
    siblings = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert siblings == [], f"temporary folders or checkpoints left behind: {siblings}"
    return json.loads((out / "stage.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("dist-data"), documents=200, task_examples=3) / "corpora" / "wb"


@pytest.fixture(scope="module")
def single3(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single3") / "stage"
    _run(_single(corpus, out, 3))
    return out


@pytest.fixture(scope="module")
def single_long(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single-long") / "stage"
    _run(_single(corpus, out, KILL_STEPS))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks_write_one_stage_matching_one_process(
    mode: str, corpus: Path, single3: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stage"
    done = _run(_torchrun(corpus, out, 3, *(["--fsdp"] if mode == "fsdp" else [])))
    record = _assert_one_complete_stage(out)
    assert record["train"]["world_size"] == 2 and record["train"]["fsdp"] == (mode == "fsdp")
    assert done.stdout.count("stage 1 (WB") == 1  # only rank 0 prints the result table
    rel, worst = distance(single3, out)
    assert rel < REL_L2 and worst < ABS, f"{mode}: relative L2 {rel:.3g}, max |Δ| {worst:.3g}"
    single = json.loads((single3 / "stage.json").read_text())
    assert abs(record["train"]["final_loss"] - single["train"]["final_loss"]) < 1e-4  # the global batch's loss


def _rank_pid(ancestor: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` (RANK in its environment) among the descendants of `ancestor`."""
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ):
            pid = int(entry.name)
            while pid > 1 and pid != ancestor:
                try:
                    pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # parent
                except (OSError, ValueError, IndexError):
                    break
            if pid == ancestor:
                return int(entry.name)
    return None


def _kill_rank_after_first_checkpoint(command: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    """Run `command` (torchrun), SIGKILL rank 1 once a complete checkpoint exists, return the finished run."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if killed is None and complete_checkpoints(checkpoint_dir(out)):
            killed = _rank_pid(process.pid, 1)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    output, _ = process.communicate(timeout=60)
    assert killed is not None, f"rank 1 was not killed (finished too early?):\n{output[-3000:]}"
    return subprocess.CompletedProcess(command, process.returncode, output, "")


@pytest.mark.slow  # ~40 s; `make test` keeps the 20-minute budget (the flow-level kill test is slow too)
def test_sigkill_of_one_rank_fails_the_launch_and_resume_continues(
    corpus: Path, single_long: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stage"
    killed = _kill_rank_after_first_checkpoint(_torchrun(corpus, out, KILL_STEPS), out)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stdout or "exitcode  : -9" in killed.stdout, killed.stdout[-3000:]
    assert not out.exists()  # nothing published
    kept = complete_checkpoints(checkpoint_dir(out))
    assert kept, "the complete checkpoint written before the kill is kept"

    _run(_torchrun(corpus, out, KILL_STEPS, "--resume"))
    record = _assert_one_complete_stage(out)
    assert record["train"]["resumed_from"] is not None and record["train"]["resumed_from"] >= int(kept[0].name[11:])
    rel, worst = distance(single_long, out)
    assert rel < REL_L2 and worst < ABS, f"relative L2 {rel:.3g}, max |Δ| {worst:.3g}"


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_under_another_world_size(corpus: Path, single_long: Path, tmp_path: Path) -> None:
    out = tmp_path / "stage"
    killed = _kill_rank_after_first_checkpoint(_torchrun(corpus, out, KILL_STEPS, "--fsdp"), out)
    assert killed.returncode != 0
    kept = complete_checkpoints(checkpoint_dir(out))
    assert kept and (kept[-1] / ".metadata").is_file()  # a torch.distributed.checkpoint folder
    _run(_single(corpus, out, KILL_STEPS, "--resume"))  # one process, no FSDP: DCP reshards 2 → 1
    record = _assert_one_complete_stage(out)
    assert record["train"]["resumed_from"] is not None and record["train"]["world_size"] == 1
    rel, worst = distance(single_long, out)
    assert rel < REL_L2 and worst < ABS, f"relative L2 {rel:.3g}, max |Δ| {worst:.3g}"


def test_fsdp_refuses_scalar_parameters() -> None:
    import loire
    from loire.distributed import shard

    model = loire.LoireForCausalLM(loire.preset("gpt-tiny", vocab_size=32, hidden_size=16, num_hidden_layers=1))
    model.register_parameter("scale", torch.nn.Parameter(torch.ones(())))
    with pytest.raises(ValueError, match="scalar parameters"):
        shard(model, torch.device("cpu"))
