"""Write docs/configuration.md from app.settings.Settings, so that the reference cannot drift from the code.

python scripts/config_reference.py          # rewrite docs/configuration.md
python scripts/config_reference.py --check  # exit 1 if it is out of date (tests/test_docs.py does this)
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from app.cli import SERVE_FLAGS
from app.settings import Settings

PAGE = ROOT / "docs" / "configuration.md"
HEADER = """# Configuration reference

<!-- Generated from app/settings.py by `python scripts/config_reference.py`: edit the Settings class, not this
page. tests/test_docs.py fails when the two differ. -->

Every setting of the service is an environment variable with the `NEXTACT_` prefix, read once at start-up
by one pydantic-settings class (`app/settings.py`). A value that does not validate stops start-up with a
message naming the variable. `nextact serve` flags override the variables (the `flag` column); the
variables override the defaults.

```bash
NEXTACT_REDIS_URL=redis://redis:6379/0 NEXTACT_WORKERS=2 nextact serve --port 8001
```

"""


def type_name(annotation: Any) -> str:
    """int, float, str, path, bool, one of a | b | c; `or unset` for optional ones."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + (", or unset" if len(inner) < len(args) else "")
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bounds(info: FieldInfo) -> str:
    parts = []
    for m in info.metadata:
        for attr, sign in (
            ("ge", ">="),
            ("gt", ">"),
            ("le", "<="),
            ("lt", "<"),
            ("min_length", "length >="),
            ("max_length", "length <="),
            ("pattern", "matches"),
        ):
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sign} `{value}`")
    return ", ".join(parts)


def variables(name: str, info: FieldInfo) -> list[str]:
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [f"NEXTACT_{name.upper()}"]


def default(info: FieldInfo) -> str:
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def render() -> str:
    flags = {field: flag for flag, field in SERVE_FLAGS.items()}
    rows = ["| variable | flag | type | default | meaning |", "|---|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        names = variables(name, info)
        variable = "<br>".join(f"`{v}`" for v in names)
        kind = type_name(info.annotation)
        limits = bounds(info)
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(
            f"| {variable} | {f'`{flags[name]}`' if name in flags else ''} | {kind}"
            f"{'; ' + limits if limits else ''} | {default(info)} | {meaning} |"
        )
    return HEADER + "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
