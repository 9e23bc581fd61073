"""Run a stage under `torchrun` as a subprocess and bring its progress, metrics and failures back.

`launch_stage(kwargs, nproc=N)` writes `kwargs` (the arguments of `loire.lifelong.run_stage`, JSON-able)
to a spec file and runs `python -m torch.distributed.run --standalone --nproc_per_node=N -m loire.launch
SPEC`. Every rank runs `run_stage`; rank 0 appends each `on_log` call to an events file (JSON lines),
which the caller's process tails and replays into its own `on_log` (MLflow, progress bars) while the
ranks train. The torchrun output is passed line by line to `on_output` (a logger).

Failures come back as exceptions, never as a hang:
- a rank raising (bad corpus, NaN loss, ...) records `{"event": "error", "rank", "type", "message"}`
  before it exits; torchrun then stops the other ranks and exits non-zero. A `TrainingDiverged` on any
  rank is raised again as `TrainingDiverged` (the caller deletes the diverged checkpoints);
- a rank that dies without a word (SIGKILL, OOM killer) is reported by torchrun's "Root Cause" summary
  (rank, exit code, signal), which the error quotes;
- either way `DistributedTrainingError` names the exit code, the rank(s) and the cause. Nothing of the
  stage folder is published unless every rank finished (rank 0 publishes after the last step); complete
  checkpoints stay, so `resume=True` continues from the last one.

If the calling process dies, the kernel sends torchrun SIGTERM (Linux `PR_SET_PDEATHSIG`), and torchrun
stops its ranks: an orphaned training never writes into a folder that a retry is using.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loire.train import OnLog, TrainingDiverged

EVENTS_ENV = "LOIRE_EVENTS_FILE"


class DistributedTrainingError(RuntimeError):
    """Training under torchrun failed: a rank raised, died, or torchrun exited non-zero."""


def visible_devices(device: str = "auto") -> int:
    """How many processes a stage uses by default: the visible CUDA devices, 1 on CPU."""
    import torch

    if device.startswith("cpu") or not torch.cuda.is_available():
        return 1
    return max(1, torch.cuda.device_count())


def torchrun_command(spec: Path, nproc: int) -> list[str]:
    """The single-node command (`--standalone`: a local rendezvous on a free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "loire.launch",
        str(spec),
    ]


def launch_stage(
    kwargs: Mapping[str, Any],
    *,
    nproc: int,
    on_log: OnLog | None = None,
    on_output: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.2,
) -> Path:
    """Run `run_stage(**kwargs)` on `nproc` local processes; returns the stage folder (`kwargs["out_dir"]`)."""
    with tempfile.TemporaryDirectory(prefix="loire-launch-") as scratch:
        spec, events = Path(scratch) / "spec.json", Path(scratch) / "events.jsonl"
        spec.write_text(json.dumps(dict(kwargs)))
        events.touch()
        process = subprocess.Popen(
            torchrun_command(spec, nproc),
            env={**(env if env is not None else os.environ), EVENTS_ENV: str(events), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        tail: collections.deque[str] = collections.deque(maxlen=200)
        reader = threading.Thread(target=_pump, args=(process, tail, on_output), daemon=True)
        reader.start()
        errors: list[dict[str, Any]] = []
        offset = 0
        try:
            while True:
                done = process.poll() is not None
                offset = _replay(events, offset, on_log, errors)
                if done:
                    break
                time.sleep(poll_s)
        except BaseException:
            _stop(process)
            raise
        finally:
            reader.join(timeout=10)
        if process.returncode != 0:
            _raise(process.returncode, errors, list(tail), nproc)
    return Path(kwargs["out_dir"])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pump(process: subprocess.Popen[str], tail: collections.deque[str], on_output: Callable[[str], None] | None):
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        if on_output is not None:
            with contextlib.suppress(Exception):  # logging must never stop the launcher
                on_output(line)


def _replay(events: Path, offset: int, on_log: OnLog | None, errors: list[dict[str, Any]]) -> int:
    """Feed the complete lines written since `offset` to `on_log`; returns the new offset."""
    with events.open("rb") as file:
        file.seek(offset)
        chunk = file.read()
    end = chunk.rfind(b"\n") + 1
    for raw in chunk[:end].splitlines():
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "metrics" and on_log is not None:
            with contextlib.suppress(Exception):  # reporting must never stop training
                on_log(event["metrics"], int(event["step"]))
        elif event.get("event") == "error":
            errors.append(event)
    return offset + end


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM torchrun (it stops its ranks), SIGKILL after 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_ROOT_CAUSE = re.compile(
    r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)[^\n]*(?:\n[^\n]*){0,2}?\n\s*traceback\s*:\s*([^\n]*)"
)


def _raise(returncode: int, errors: list[dict[str, Any]], tail: list[str], nproc: int) -> None:
    text = "\n".join(tail)
    causes = []
    if "Root Cause" in text:
        for rank, code, trace in _ROOT_CAUSE.findall(text.split("Root Cause", 1)[1]):
            name = ""
            if int(code) < 0:
                with contextlib.suppress(ValueError):
                    name = f" ({signal.Signals(-int(code)).name})"
            causes.append(f"rank {rank} exited with code {code}{name}" + (f": {trace.strip()}" if trace else ""))
    raised = [f"rank {e.get('rank')}: {e.get('type')}: {e.get('message')}" for e in errors]
    detail = "; ".join(raised + causes) or "no rank reported an error (last output:\n" + "\n".join(tail[-20:]) + ")"
    message = f"training under torchrun ({nproc} processes) failed with exit code {returncode}: {detail}"
    if any(e.get("type") == TrainingDiverged.__name__ for e in errors):
        raise TrainingDiverged(message)
    raise DistributedTrainingError(message)


# ----- the rank side: python -m loire.launch SPEC -----
def _emit(event: dict[str, Any]) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    line = (json.dumps(event, default=float) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write of one line: O_APPEND keeps lines of different ranks whole
    finally:
        os.close(fd)


def _schedule(value: Any) -> Any:
    """A preset name or the path of a schedule YAML file (as `flows.settings.resolve_schedule`)."""
    from loire.schedule import SCHEDULES, Schedule

    if isinstance(value, str) and value not in SCHEDULES and Path(value).suffix.lower() in (".yaml", ".yml"):
        return Schedule.from_yaml(Path(value).expanduser())
    return value


def main(argv: list[str] | None = None) -> int:
    import logging

    from loire import distributed
    from loire.lifelong import run_stage

    args = sys.argv[1:] if argv is None else argv
    kwargs = json.loads(Path(args[0]).read_text())
    logging.basicConfig(level=logging.INFO, format=f"[rank{distributed.rank()}] %(levelname)s %(name)s: %(message)s")
    kwargs["schedule"] = _schedule(kwargs.get("schedule", "gpt-tiny"))
    domain, corpus, out_dir = kwargs.pop("domain"), kwargs.pop("corpus"), kwargs.pop("out_dir")

    def on_log(metrics: dict[str, float], step: int) -> None:
        _emit({"event": "metrics", "step": step, "metrics": metrics})

    try:
        run_stage(domain, corpus, out_dir, on_log=on_log, progress=False, **kwargs)
    except BaseException as exc:
        _emit({"event": "error", "rank": distributed.rank(), "type": type(exc).__name__, "message": str(exc)})
        raise
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
