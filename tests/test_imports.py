import subprocess
import sys


def test_library_imports_no_orchestration_or_storage_clients() -> None:
    code = (
        "import sys, importlib, pkgutil, loire\n"
        "for m in pkgutil.walk_packages(loire.__path__, 'loire.'): importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'mlflow', 'boto3', 'botocore'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
