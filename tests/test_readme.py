"""The README and docs/: the opening CI relies on, and every link and example they name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_opens_with_the_name_one_sentence_and_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    title, sentence, block = text.split("\n\n")[:3]
    assert title == "# noisescale"
    assert sentence.startswith("noisescale ") and sentence.count(". ") == 0 and sentence.endswith(".")
    lines = block.splitlines()
    assert lines[0] == "```bash" and lines[-1] == "```"
    assert [line.split("#")[0].strip() for line in lines[1:-1]] == ["make demo", "make test"]


def test_links_and_named_examples_exist() -> None:
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
        for script in re.findall(r"examples/\w+\.py", text):
            assert (ROOT / script).exists(), f"{page.name} names missing {script}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"docs/{page.name} is not linked from the README"
