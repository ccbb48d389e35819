"""House rules that keep the map true: imports flow kernels <- model <- server, and files stay small."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"kernels": 0, "model": 1, "server": 2}
MAX_LINES = 300


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


SOURCES = sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    layer = path.relative_to(ROOT).parts[0]
    upward = {pkg for pkg in imported_packages(path) if LAYERS[pkg] > LAYERS[layer]}
    assert not upward, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(upward)}: kernels <- model <- server"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_one_concept_per_file_stays_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_walk_sees_upward_imports(tmp_path):
    """The rule above could pass vacuously if the walk missed imports; it must catch both forms."""
    bad = tmp_path / "bad.py"
    bad.write_text("import server.engine\ndef f():\n    from model.llama import load_model\n")
    assert imported_packages(bad) == {"server", "model"}


def test_only_server_config_reads_the_environment():
    readers = [p.relative_to(ROOT) for p in SOURCES if "os.environ" in p.read_text() or "getenv" in p.read_text()]
    assert [str(p) for p in readers] == ["server/config.py"]
