"""`make demo` twice, and what the demo prints (issue 16): no server needed."""

from __future__ import annotations

import io
import shlex
from pathlib import Path

from rich.console import Console

from flows.demo import DEMO_STATE, _where_to_look, clear_previous_demo, drop_corpus, summary_table


def test_a_batch_dropped_twice_is_replaced_and_nothing_partial_is_left(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "part-0.jsonl").write_text('{"text": "one"}\n')
    landing = tmp_path / "landing"
    first = drop_corpus(source, landing, "WB")
    (source / "part-0.jsonl").write_text('{"text": "two"}\n')
    second = drop_corpus(source, landing, "WB")  # was: [Errno 39] Directory not empty
    assert first == second and "two" in (second / "part-0.jsonl").read_text() and (second / "_SUCCESS").is_file()
    assert not list(landing.glob(".*partial"))


def test_a_second_demo_run_clears_only_the_demo_state(tmp_path: Path) -> None:
    for name in DEMO_STATE:
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    out = io.StringIO()
    clear_previous_demo(tmp_path, Console(file=out, width=200))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and "fresh run" in out.getvalue()


def test_closing_commands_run_as_shown_and_tables_are_readable_off_a_terminal(tmp_path: Path) -> None:
    text = _where_to_look(tmp_path, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, 12.0)
    commands = [line.split("&&")[-1].strip() for line in text.splitlines() if "ui --backend-store-uri" in line]
    assert commands and Path(shlex.split(commands[0])[0]).is_file(), text  # the venv's mlflow, by absolute path
    prefect = next(line for line in text.splitlines() if "server start" in line)
    assert Path(shlex.split(prefect.split("PREFECT_HOME=")[1])[1]).is_file(), prefect
    results = [
        {"domain": "WB", "stage": 1, "version": "1", "ap": 300.0, "ap_plus": None, "promoted": True, "reasons": []},
        {
            "domain": "REV",
            "stage": 3,
            "version": "3",
            "ap": 250.0,
            "ap_plus": 453.5,
            "promoted": False,
            "reasons": ["fail: AP+ 453.5 > 100"],
        },
        {
            "domain": "BIO",
            "stage": 3,
            "version": "4",
            "ap": 240.0,
            "ap_plus": -3.0,
            "promoted": True,
            "carried": ["REV"],
        },
    ]
    out = io.StringIO()
    Console(file=out, width=160).print(summary_table(results, 100.0))
    shown = out.getvalue()
    assert "AP+ (gate <= 100)" in shown and "fail: AP+ 453.5 > 100" in shown and "REV" in shown, shown
