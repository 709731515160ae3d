"""Running `python -m training` in-process from a test: its JSON answer, or its one-line error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from training.__main__ import main


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """The JSON object a successful command prints."""
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The stderr of a command that stops with status 2 (one line, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err
