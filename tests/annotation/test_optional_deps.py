"""The annotation app's packages are the `annotate` extra: without them the CLI still builds, and
`speechrl annotate ...` names the extra to install instead of failing with a traceback.

Absence is simulated in a subprocess (sys.modules entries set to None), so nothing is uninstalled.
"""
from __future__ import annotations

import subprocess
import sys

BLOCK = "import sys\nfor m in ('fastapi', 'uvicorn', 'sqlalchemy', 'alembic'):\n    sys.modules[m] = None\n"


def run_without_extra(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_builds_without_the_extra(tmp_path):
    r = run_without_extra(
        "from speechrl.rlhf.cli import main\n"
        "for argv in (['--help'], ['annotate', '--help'], ['annotate', 'tasks', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "annotate" in r.stdout and "--strategy" in r.stdout


def test_annotate_command_names_the_extra(tmp_path):
    r = run_without_extra("from speechrl.rlhf.cli import main\nsys.exit(main(['annotate', 'stats']))\n", tmp_path)
    assert r.returncode == 2, r.stderr
    assert "pip install 'speechrl[annotate]'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "annotations.db").exists()
