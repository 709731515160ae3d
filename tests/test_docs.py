"""The docs site (docs/, mkdocs.yml): the configuration page is the generated one, every page is in the nav,
and the commands the pages show do what they say where they can run here: each `nextact` / `python -m
training` command's options exist (its real --help), `./dev.sh` subcommands and scripts exist, and every
curl example gets a 2xx from the real service."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.settings import Settings
from scripts.config_reference import PAGE, render
from tests.app_client import running_app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
COMMAND_START = re.compile(
    r"^\s*(?:\$ )?(nextact|python -m training|\./dev\.sh|curl|python (?:bench|scripts)/)"
)


def shell_lines(path: Path) -> list[str]:
    """Commands in the page's code (fenced blocks and 4-space indented blocks), continuation lines joined."""
    lines: list[str] = []
    in_fence, pending = False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if not (in_fence or raw.startswith("    ") or pending):
            continue
        line = pending + raw.strip() if pending else raw
        pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        if COMMAND_START.match(line):
            lines.append(line.strip().removeprefix("$ "))
    return lines


def commands(prefix: str) -> list[tuple[str, str]]:
    found = []
    for path in SOURCES:
        for line in shell_lines(path):
            if line.startswith(prefix):
                words = shlex.split(line, comments=True)
                found.append((f"{path.relative_to(ROOT)}: {line}", shlex.join(words)))
    return found


@cache
def help_text(*command: str) -> str:
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(command)} --help: {done.stderr}"
    return done.stdout


def test_configuration_page_is_generated_from_settings() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date: run python scripts/config_reference.py"
    )


def test_every_setting_is_documented() -> None:
    page = PAGE.read_text(encoding="utf-8")
    missing = [
        f"NEXTACT_{name.upper()}" for name in Settings.model_fields if f"`NEXTACT_{name.upper()}`" not in page
    ]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return []

    nav = pages(config["nav"])
    assert len(nav) == len(set(nav))
    assert set(nav) == {p.name for p in DOCS.glob("*.md")}, "docs/*.md and mkdocs.yml's nav differ"


@pytest.mark.parametrize(("where", "line"), commands("nextact") + commands("python -m training"))
def test_cli_commands_in_the_docs_use_real_options(where: str, line: str) -> None:
    words = line.split()
    if words[0] == "python":
        module, words = ["-m", "training"], words[3:]
    else:
        module, words = ["-m", "app.cli"], words[1:]
    if not words or words[0].startswith("-"):
        assert all(w in help_text(*module) for w in words), where
        return
    command, options = words[0], [w for w in words[1:] if w.startswith("--")]
    text = help_text(*module, command)
    for option in options:
        name = option.split("=")[0].strip("[]")
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{where}: {name} is not an option"


@pytest.mark.parametrize(("where", "line"), commands("./dev.sh"))
def test_dev_sh_commands_in_the_docs_exist(where: str, line: str) -> None:
    script = (ROOT / "dev.sh").read_text(encoding="utf-8")
    subcommand = line.split()[1]
    assert re.search(rf"^\s+{subcommand}\)", script, re.MULTILINE), f"{where}: dev.sh has no {subcommand!r}"
    if subcommand == "serve":
        for option in (w for w in line.split()[2:] if w.startswith("--")):
            assert option in help_text("-m", "app.cli", "serve"), f"{where}: {option}"


@pytest.mark.parametrize(("where", "line"), commands("python bench/") + commands("python scripts/"))
def test_scripts_in_the_docs_exist(where: str, line: str) -> None:
    assert (ROOT / line.split()[1]).is_file(), where


def curl_requests() -> list[tuple[str, str, str, str | None]]:
    """(where, method, path?query, body) of every curl example that needs nothing from the reader's shell."""
    found = []
    for where, line in commands("curl"):
        if "$" in line:  # needs an API key from the reader: authentication has its own tests
            continue
        if "promote" in line or "target=candidate" in line:  # need a candidate model: tests/test_candidate.py
            continue
        words = shlex.split(line)
        words = words[: words.index("|")] if "|" in words else words
        method, body, url = "GET", None, ""
        i = 1
        while i < len(words):
            word = words[i]
            if word in ("-X", "--request"):
                method, i = words[i + 1], i + 2
            elif word.startswith("-X") and len(word) > 2:
                method, i = word[2:], i + 1
            elif word in ("-d", "--data"):
                body, method, i = words[i + 1], "POST" if method == "GET" else method, i + 2
            elif word in ("-H", "--header"):
                i += 2
            elif word.startswith("-"):
                i += 1
            else:
                url, i = word, i + 1
        parts = urlsplit(url if "://" in url else f"http://{url}")
        found.append((where, method, parts.path + (f"?{parts.query}" if parts.query else ""), body))
    return found


def test_curl_examples_get_2xx_from_the_real_service(behavior_artifact: Path, redis_url: str) -> None:
    requests = curl_requests()
    assert len(requests) >= 10, requests

    async def run() -> list[str]:
        failures = []
        async with running_app(behavior_artifact, redis_url) as (_, client):
            for where, method, target, body in requests:
                headers = {"Content-Type": "application/json"} if body else {}
                response = await client.request(method, target, content=body, headers=headers)
                if not 200 <= response.status_code < 300:
                    failures.append(f"{where}\n  -> {response.status_code} {response.text[:200]}")
        return failures

    failures = asyncio.run(run())
    assert not failures, "\n".join(failures)
