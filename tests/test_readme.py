"""The README is the front door: short, opening with the two commands, every link and file it names real."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_setup_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.DOTALL)
    assert first_block, "README has no bash block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["./dev.sh serve", "./dev.sh test"]


def test_readme_is_a_front_door_not_a_manual() -> None:
    size = len(README.encode("utf-8"))
    assert size < 10_000, f"README.md is {size} bytes: move the detail to docs/"


def test_ci_runs_the_readme_test_command() -> None:
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_links_and_paths_exist() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the docs pages"
    for link in local:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    for path in re.findall(r"`((?:docs|deploy|requirements|examples|app|training)/[\w./-]*)`", README):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    for page in ("quickstart", "api", "training", "deployment", "operations", "configuration"):
        assert f"docs/{page}.md" in local, f"the README does not link docs/{page}.md"
