"""The distribution: every imported package declared, the base install usable without the optional extras."""

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from fed_userllm.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"fed_userllm"} | {p.stem for p in (ROOT / "tests").glob("*.py")}  # and the tests' helpers
PEER_RUNNER = ROOT / "benchmarks" / "recbole_peer.py"  # runs in RecBole's own venv (make bench-peers)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def imported_modules(folder: Path) -> set[str]:
    """Top-level names of the absolute imports of every Python file under ``folder`` (a file: that file)."""
    names = set()
    for path in [folder] if folder.is_file() else folder.rglob("*.py"):
        if path == PEER_RUNNER and folder != PEER_RUNNER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in FIRST_PARTY}


def test_every_imported_package_is_declared():
    distributions = packages_distributions()
    extras = PYPROJECT["optional-dependencies"]
    runtime = declared(PYPROJECT["dependencies"]) | declared([r for k, v in extras.items() if k != "dev" for r in v])
    for folders, allowed in ((("fed_userllm", "clients", "server", "export"), runtime),
                             (("tests", "benchmarks"), runtime | declared(extras["dev"]))):
        for folder in folders:
            for module in imported_modules(ROOT / folder):
                owners = {canonical(d) for d in distributions.get(module, [])}
                assert owners & allowed, f"{folder}/ imports {module} (from {owners or '?'}): not declared"


def test_the_peer_runner_imports_only_what_its_own_venv_declares():
    """RecBole is never a dependency of the project: its runner imports what requirements-peers.txt pins,
    plus recbole itself (installed --no-deps by the Makefile)."""
    lines = (ROOT / "benchmarks" / "requirements-peers.txt").read_text().splitlines()
    allowed = declared([line for line in lines if line and not line.startswith("#")]) | {"recbole"}
    assert {canonical(m) for m in imported_modules(PEER_RUNNER)} <= allowed
    assert "recbole" not in str(PYPROJECT)


def test_extras_are_declared_and_all_installs_them():
    extras = PYPROJECT["optional-dependencies"]
    assert set(EXTRAS) <= set(extras) and extras["all"] == ["fed-userllm[export,serve]"]
    distributions = packages_distributions()
    for extra, modules in EXTRAS.items():
        for module in modules:
            assert {canonical(d) for d in distributions[module]} & declared(extras[extra]), (extra, module)


def test_the_base_install_works_without_the_extras_and_names_them_when_needed():
    """Every core module imports with the extras' packages absent; the commands that need them say which."""
    code = f"""
        import pkgutil, sys
        for name in {sorted({m for modules in EXTRAS.values() for m in modules} - {"fastapi", "uvicorn"})}:
            sys.modules[name] = None  # not installed (fastapi and uvicorn come with flwr)
        import fed_userllm, fed_userllm.clients, fed_userllm.server
        from fed_userllm.cli import main
        optional = ("fed_userllm.export", "fed_userllm.serving.")
        for package in (fed_userllm, fed_userllm.clients, fed_userllm.server):
            for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                if not module.name.startswith(optional):
                    __import__(module.name)
        assert main(["serve", "--model", "run"]) == 2
        assert main(["export", "run", "--out", "artifact"]) == 2
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'fed-userllm[serve]'" in result.stderr and "prometheus_client not installed" in result.stderr
    assert "pip install 'fed-userllm[export]'" in result.stderr and "executorch, torchao" in result.stderr
