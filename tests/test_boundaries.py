"""The dependency rules of the layout, checked in fresh interpreters: objectives runs with torch alone (no Optuna,
no MLflow), the trial record's schema (records) imports no MLflow, study or dashboards, and dashboards nothing of study."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _modules_after_importing(package: str) -> list[str]:
    """Every module of `package` imported in a fresh interpreter: what sys.modules then holds."""
    probe = (f"import json, pkgutil, importlib, sys, {package}\n"
             f"for info in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
             "    if not info.name.endswith('.__main__'):  # a command line, which runs when imported\n"
             "        importlib.import_module(info.name)\n"
             "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _top_level(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


@pytest.mark.parametrize("package, forbidden", [("objectives", {"optuna", "mlflow", "records", "study", "dashboards"}),
                                                ("records", {"mlflow", "study", "dashboards"}), ("dashboards", {"study"})])
def test_package_imports_only_what_it_may(package, forbidden):
    modules = _modules_after_importing(package)
    assert package in modules
    assert not _top_level(modules) & forbidden, sorted(name for name in modules if name.split(".")[0] in forbidden)
