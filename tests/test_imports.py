import subprocess
import sys

PIPELINE = ("prefect", "mlflow", "boto3", "botocore", "flows")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_library_imports_no_orchestration_or_storage_clients() -> None:
    result = run_python(
        "import sys, importlib, pkgutil, loire\n"
        "for m in pkgutil.walk_packages(loire.__path__, 'loire.'): importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {PIPELINE!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_imports_without_the_pipeline() -> None:
    result = run_python(
        "import sys, loire, loire.cli\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {PIPELINE!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_pipeline_commands_join_the_app_and_stay_lazy() -> None:
    result = run_python(
        "import sys, loire.cli as cli\n"
        "cli.load_pipeline_commands()\n"
        "names = {c.name for c in cli.app.registered_commands}\n"
        "assert set(cli.PIPELINE_COMMANDS) <= names, names\n"
        "assert cli.app.registered_commands[-1].callback.__module__ == 'flows.cli'\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'mlflow', 'boto3'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
