"""The repository keeps its promises to a newcomer: CI runs the README's test command verbatim,
and the `seqpar` command works."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_readme_test_command_verbatim():
    main_job, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must appear verbatim in .ci/run"
    assert "pytest" in tests and "torch==2.13.0" in tests
    assert main_job.startswith("python -m pip install torch==2.13.0")


def test_seqpar_env_runs():
    out = subprocess.run([sys.executable, "-m", "seqpar.cli", "env"], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout and "backend torch   usable" in out.stdout
    js = subprocess.run([sys.executable, "-m", "seqpar.cli", "env", "--json"], capture_output=True, text=True,
                        check=True)
    import json

    r = json.loads(js.stdout)
    assert r["distributed"]["gloo"] is True
    assert r["kernel_backends"]["torch"] == "usable"


def test_kernels_folder_is_not_a_package():
    """`import kernels` from the repo root must not find our folder (it would shadow PyPI's)."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    import seqpar_kernels

    assert Path(seqpar_kernels.__file__).parent == ROOT / "kernels" / "seqpar_kernels"
