"""`nextact`: one command for the service and the trainer.

    nextact serve [--host --port --artifact-dir --workers --redis-url ...]   the HTTP service (python -m app)
    nextact train ...                                                         train and export an artifact
    nextact evaluate ...                                                      score an artifact on a log
    nextact quantize --artifact A --out B                                     int8 output-layer copy of A

`serve` flags override NEXTACT_* environment variables, which override the defaults of app/settings.py.
`train`, `evaluate` and `quantize` are the training package's command line (python -m training), loaded only when asked
for: the service itself never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

from app import __version__

# serve flag -> Settings field; every one is also the NEXTACT_<FIELD> environment variable
SERVE_FLAGS: dict[str, str] = {
    "--host": "host",
    "--port": "port",
    "--artifact-dir": "artifact_dir",
    "--workers": "workers",
    "--redis-url": "redis_url",
    "--device": "device",
    "--data-dir": "data_dir",
    "--log-level": "log_level",
}
TRAIN_MODULES = ("torch", "onnx", "onnxscript", "tqdm")  # what `train`/`evaluate` import beyond the service's
TRAIN_INSTALL = (
    'install the training dependencies: pip install "nextact[train]" (for the CPU-only torch build first: '
    "pip install torch --index-url https://download.pytorch.org/whl/cpu), or run ./dev.sh setup"
)
EXAMPLES = {
    "serve": "nextact serve --port 8001 --artifact-dir artifacts/my-model",
    "train": "nextact train --data events.csv --action-col item_id --out artifacts/my-model",
    "evaluate": "nextact evaluate --artifact artifacts/my-model --data events.csv --protocol sampled",
    "quantize": "nextact quantize --artifact artifacts/my-model --out artifacts/my-model-int8",
}


def _env(field: str) -> str:
    return f"NEXTACT_{field.upper()}"


def _default(field: str) -> str:
    """The value the service would use without the flag: the environment's, else the Settings default."""
    from app.settings import Settings

    if _env(field) in os.environ:
        return f"{os.environ[_env(field)]} from {_env(field)}"
    default = Settings.model_fields[field].default
    return "unset" if default is None else str(default)


def _epilog(command: str) -> str:
    return f"example:\n  {EXAMPLES[command]}"


def _add_serve(sub: Any) -> None:
    from app.settings import Settings

    p = sub.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service (uvicorn, one or more workers).",
        epilog=_epilog("serve") + "\n\nEvery other setting is an environment variable: see the configuration "
        "reference (docs/configuration.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, field in SERVE_FLAGS.items():
        info = Settings.model_fields[field]
        description = (info.description or "").rstrip(".")
        p.add_argument(
            flag,
            dest=field,
            default=None,
            metavar=field.upper(),
            help=f"{description} (default: {_default(field).replace('%', '%%')}; env {_env(field)})",
        )


def _training_parsers() -> dict[str, argparse.ArgumentParser]:
    """The training package's own `train` and `evaluate` parsers (options and defaults defined once, there)."""
    training_cli = importlib.import_module("training.__main__")
    parser: argparse.ArgumentParser = training_cli.build_parser()
    sub = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )  # argparse has no public accessor
    return dict(sub.choices)


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextact",
        description="Predict a user's next action: the HTTP service and its trainer.",
        epilog="examples:\n  "
        + "\n  ".join(EXAMPLES.values())
        + "\n\n`nextact COMMAND --help` for each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nextact {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,train,evaluate,quantize}")
    _add_serve(sub)
    training = _training_parsers() if with_training else {}
    for name, summary in (
        ("train", "train, evaluate and export an artifact directory"),
        ("evaluate", "score an artifact and the baselines on the same split"),
        ("quantize", "write an artifact's int8 output-layer copy, gated against it"),
    ):
        parents = [training[name]] if name in training else []
        sub.add_parser(
            name,
            parents=parents,
            add_help=not parents,
            help=summary,
            description=summary,
            epilog=_epilog(name),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter
            if not parents
            else argparse.RawDescriptionHelpFormatter,
        )
    return parser


def _training_available() -> bool:
    return importlib.util.find_spec("training") is not None


def _missing_training_modules() -> list[str]:
    return [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]


def serve(args: argparse.Namespace) -> int:
    """Flags become NEXTACT_* variables, checked as Settings, then `python -m app` runs with them."""
    from pydantic import ValidationError

    from app.settings import Settings, get_settings

    for field in SERVE_FLAGS.values():
        value = getattr(args, field)
        if value is not None:
            os.environ[_env(field)] = str(value)
    try:
        Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"{_flag(str(err['loc'][0]))}: {err['msg']} (got {err.get('input')!r})" for err in e.errors()
        )
        print(f"nextact serve: {problems}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("onnxruntime") is None:
        print(
            'nextact serve: ONNX Runtime is not installed: pip install "nextact[cpu]" (or "nextact[gpu]" on '
            "a host with an NVIDIA GPU)",
            file=sys.stderr,
        )
        return 2
    get_settings.cache_clear()
    from app.__main__ import main as run_service

    return run_service()


def _flag(field: str) -> str:
    name = field.removeprefix("NEXTACT_").lower()
    for flag, known in SERVE_FLAGS.items():
        if known == name:
            return f"{flag} / {_env(name)}"
    return _env(name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in ("train", "evaluate", "quantize") and not _training_available():
        print(
            f"nextact {command}: the training package is not installed here (the serving image has only "
            f"the service); {TRAIN_INSTALL}",
            file=sys.stderr,
        )
        return 2
    parser = build_parser(with_training=_training_available())
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    missing = _missing_training_modules()
    if missing:
        print(f"nextact {args.command}: {', '.join(missing)} not installed; {TRAIN_INSTALL}", file=sys.stderr)
        return 2
    training_cli = importlib.import_module("training.__main__")
    return int(training_cli.main(argv))


if __name__ == "__main__":
    sys.exit(main())
