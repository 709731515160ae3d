"""Reading the deployment files the way Docker and Compose do, closely enough to test what they say.

No container engine runs here, so the tests read the Dockerfile (stages, instructions, heredocs, build
arguments) and docker-compose.yml (YAML plus ${VAR:-default} interpolation) and check the facts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERIGNORE = ROOT / ".dockerignore"

_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # everything after the keyword, continuation lines joined, heredoc bodies appended
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None

    def flags(self) -> dict[str, str]:
        """--name=value options before the arguments (HEALTHCHECK, COPY)."""
        return dict(re.findall(r"--([\w-]+)=(\S+)", self.args.split(" CMD ")[0]))


@dataclass
class Stage:
    name: str
    base: str  # the FROM argument with build arguments substituted
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def parse(cls, path: Path = DOCKERFILE, build_args: dict[str, str] | None = None) -> Dockerfile:
        instructions = _instructions(path.read_text(encoding="utf-8"))
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        for ins in instructions:
            if ins.keyword == "ARG" and not stages:
                name, _, default = ins.args.partition("=")
                global_args[name.strip()] = (build_args or {}).get(name.strip(), default.strip())
            elif ins.keyword == "FROM":
                words = ins.args.split()
                base = _substitute(words[0], global_args)
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
                stages.append(Stage(name=name, base=base))
            else:
                stages[-1].instructions.append(ins)
        return cls(global_args, stages)

    def arg(self, name: str) -> str:
        """The default of a build argument, global or declared in a stage."""
        if name in self.global_args:
            return self.global_args[name]
        for s in self.stages:
            for ins in s.all("ARG"):
                key, _, default = ins.args.partition("=")
                if key.strip() == name:
                    return default.strip()
        raise KeyError(f"{DOCKERFILE}: no build argument {name}")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{DOCKERFILE}: no stage named {name!r} (have {[s.name for s in self.stages]})")

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, base first (what ends up in its image)."""
        names = {s.name for s in self.stages}
        chain = [self.stage(name)]
        while chain[0].base in names:
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def external_base(self, name: str) -> str:
        """The registry image a stage finally rests on."""
        return self.chain(name)[0].base

    def effective(self, name: str, keyword: str) -> list[Instruction]:
        """Instructions of one kind in the stage's image, inherited ones first."""
        return [i for s in self.chain(name) for i in s.all(keyword)]

    def last(self, name: str, keyword: str) -> Instruction:
        found = self.effective(name, keyword)
        if not found:
            raise KeyError(f"{DOCKERFILE}: stage {name!r} has no {keyword}")
        return found[-1]

    def env(self, name: str) -> dict[str, str]:
        """ENV of the stage's image (inherited ones first, later ones win), $VAR references expanded."""
        env: dict[str, str] = {}
        for ins in self.effective(name, "ENV"):
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = _substitute(value, env)
        return env

    def copied_stages(self, name: str) -> list[str]:
        """Stages whose files a stage's image holds: its FROM chain and every COPY --from of those."""
        seen: list[str] = []
        todo = [name]
        names = {s.name for s in self.stages}
        while todo:
            current = todo.pop()
            for s in self.chain(current):
                if s.name in seen:
                    continue
                seen.append(s.name)
                for copy in s.all("COPY"):
                    source = copy.flags().get("from")
                    if source in names:
                        todo.append(source)
        return seen


def _instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions: comments dropped, `\\` continuations joined, heredocs kept."""
    lines = text.splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        raw = lines[i].strip()
        start = i + 1
        i += 1
        if not raw or raw.startswith("#"):
            continue
        parts = [raw]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1].rstrip()
            nxt = lines[i].strip()
            i += 1
            if nxt and not nxt.startswith("#"):
                parts.append(nxt)
        joined = " ".join(parts)
        for marker in _HEREDOC.findall(joined):
            body = []
            while i < len(lines) and lines[i].strip() != marker:
                body.append(lines[i])
                i += 1
            i += 1  # the closing marker
            joined += "\n" + "\n".join(body)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def _substitute(text: str, values: dict[str, str]) -> str:
    """Expand ${VAR}, ${VAR:-default} and $VAR the way Dockerfiles and Compose do."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2) or ""
        return values.get(name) or default

    return _VAR.sub(one, text)


def load_compose(path: Path = COMPOSE, env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml after ${VAR:-default} interpolation (from env, else the default, like Compose)."""
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(_substitute(text, dict(os.environ if env is None else env)))
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of Compose's two spellings, as strings."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def settings_env_names() -> set[str]:
    """Every environment variable Settings reads (upper case): NEXTACT_<field>, or the field's aliases."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice).upper() for choice in alias.choices}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def nextact_names(text: str) -> set[str]:
    """Every NEXTACT_* identifier a file mentions."""
    return set(re.findall(r"\bNEXTACT_[A-Z0-9_]+\b", text))


def image_command() -> list[str]:
    """The serving image's CMD; `python` is this interpreter (the venv, as /opt/venv is in the image)."""
    cmd = Dockerfile.parse().last("serve", "CMD").exec_form()
    assert cmd, f"{DOCKERFILE}: the serving image's CMD must be in exec form"
    return [sys.executable if word == "python" else word for word in cmd]


def image_environment(redis_url: str, artifact_dir: Path) -> dict[str, str]:
    """NEXTACT_* as the api container sees them: the image's ENV, then the compose api service's environment.

    Replaced, because they cannot hold on a test machine: the Redis URL and the artifact directory.
    Left out, for the process helper to set: the listening address (a free loopback port, not 0.0.0.0:8000).
    """
    env = {k: v for k, v in Dockerfile.parse().env("serve").items() if k.startswith("NEXTACT_")}
    env |= compose_env(load_compose(env={})["services"]["api"])
    env |= {"NEXTACT_REDIS_URL": redis_url, "NEXTACT_ARTIFACT_DIR": str(artifact_dir)}
    for key in ("NEXTACT_HOST", "NEXTACT_PORT"):
        env.pop(key)
    return env
