"""The README is the front door: its set-up commands, CI and settings table must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_setup_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.DOTALL)
    assert first_block, "README has no bash block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["./dev.sh serve", "./dev.sh test"]


def test_ci_runs_the_readme_test_command() -> None:
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_setting_is_documented() -> None:
    """In the README's table, or in a docs/ page's settings table (the docs site is taking over)."""
    docs = README + "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    missing = [f"NEXTACT_{name.upper()}" for name in Settings.model_fields if f"`NEXTACT_{name.upper()}`" not in docs]
    assert not missing, f"settings missing from the README's and docs/ settings tables: {missing}"
