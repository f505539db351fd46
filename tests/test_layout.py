"""The package follows the map in the README's "How the code is organised" (issue 12).

Every module and package under ``src/noisescale`` is on the map and every entry on the map exists; no module
grows past 500 lines; no module imports the package root, so imports flow one way; tests mirror the packages.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "noisescale"
MAX_LINES = 500


def _map_entries() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## How the code is organised", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    return {m.group(1) for m in re.finditer(r"^  (\S+?)/?\s{2,}", block, re.MULTILINE)}


def _top_level() -> set[str]:
    names = set()
    for path in PACKAGE.iterdir():
        is_module = path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py")
        if is_module or (path / "__init__.py").exists():
            names.add(path.name)
    return names


def test_readme_map_lists_exactly_the_modules() -> None:
    entries, tree = _map_entries(), _top_level()
    assert entries == tree, f"on the map only: {entries - tree}; in src only: {tree - entries}"


def test_readme_map_names_every_submodule() -> None:
    text = (ROOT / "README.md").read_text().split("## How the code is organised", 1)[1].split("\n## ", 1)[0]
    for package in ("meter", "critical", "experiments", "cli"):
        for path in (PACKAGE / package).glob("*.py"):
            if path.stem != "__init__":
                found = re.search(rf"\b{path.stem}\b", text)
                assert found, f"{package}/{path.name} is not on the README's map"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small_and_never_imports_the_root(path: Path) -> None:
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines, over {MAX_LINES}: split it by concept"
    if path == PACKAGE / "__init__.py":
        return
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            assert all(a.name != "noisescale" for a in node.names), f"{path.name} imports the package root"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "noisescale":
            # `from noisescale import distributed` names a submodule: fine; a name of the root's is not.
            for alias in node.names:
                is_module = (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()
                assert is_module, f"{path.name} imports {alias.name} from the package root"


def test_tests_mirror_the_packages() -> None:
    for package in ("meter", "per_example", "critical", "experiments", "cli", "integrations"):
        assert (ROOT / "tests" / package).is_dir(), f"tests/{package}/ is missing"
