import importlib.util
import subprocess
import sys

import pytest

PIPELINE = ("prefect", "mlflow", "boto3", "botocore", "flows")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def assert_imports_none_of(code: str, roots: tuple[str, ...] = PIPELINE) -> None:
    """`code` runs in a fresh interpreter and leaves no module of `roots` imported."""
    check = (
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {roots!r})\nprint(bad); sys.exit(1 if bad else 0)\n"
    )
    result = run_python("import sys\n" + code + check)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_imports_no_orchestration_or_storage_clients() -> None:
    assert_imports_none_of(
        "import importlib, pkgutil, loire\n"
        "for m in pkgutil.walk_packages(loire.__path__, 'loire.'): importlib.import_module(m.name)\n"
    )


def test_cli_imports_without_the_pipeline() -> None:
    assert_imports_none_of("import loire, loire.cli\n")


@pytest.mark.skipif(importlib.util.find_spec("prefect") is None, reason="needs the pipeline extra")
def test_pipeline_commands_join_the_app_and_stay_lazy() -> None:
    assert_imports_none_of(
        "import loire.cli as cli\n"
        "cli.load_pipeline_commands()\n"
        "names = {c.name for c in cli.app.registered_commands}\n"
        "assert set(cli.PIPELINE_COMMANDS) <= names, names\n"
        "assert cli.app.registered_commands[-1].callback.__module__ == 'flows.cli'\n",
        roots=("prefect", "mlflow", "boto3"),
    )


def test_pipeline_commands_without_the_pipeline_say_what_to_install() -> None:
    result = run_python(
        "import sys\n"
        "sys.modules['flows.cli'] = None  # as if the pipeline extra were not installed\n"
        "from typer.testing import CliRunner\n"
        "import loire.cli as cli\n"
        "cli.load_pipeline_commands()\n"
        "r = CliRunner().invoke(cli.app, ['demo', '--quick', '--out', 'x'])\n"
        "print(r.output); sys.exit(r.exit_code)\n"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'loire[pipeline]'" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("prefect") is None, reason="needs the pipeline extra")
def test_python_m_loire_cli_has_the_pipeline_commands() -> None:
    """`python -m loire.cli` (the demo test, torchrun) runs the app that flows/cli.py registered on."""
    result = subprocess.run(
        [sys.executable, "-m", "loire.cli", "--help"], capture_output=True, text=True, timeout=120, env=None
    )
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in ("demo", "lineage", "resume-crashed", "train-stage"))
