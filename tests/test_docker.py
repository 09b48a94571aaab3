"""The Docker deployment: docker/Dockerfile, docker/docker-compose.yml and the root .dockerignore.

No Docker engine runs on this project's machines, so no image is built or started here. What is
checked instead: the Dockerfile as text, per image (``serve``: no PyTorch at all, the release with
every graph copied from the worker stage; ``worker``: CPU-only PyTorch installed before the project;
both: a non-root user), the serve image's health check, which is also run against a stand-in server, the build context that
.dockerignore leaves, and the compose file as Compose itself resolves it (``docker compose config``
needs no engine) where the docker CLI has the compose plugin, else as YAML with its ``${VAR:-default}``
values filled in the way Compose fills them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SERVICES = {"label-studio", "backend", "worker", "postgres", "redis"}
APP_SERVICES = ("backend", "worker")

# Label Studio 1.23.2's default banned subnets (label_studio/core/utils/io.py, validate_ip()): it
# refuses an ML backend (ML_BLOCK_LOCAL_IP) or webhook (SSRF_PROTECTION_ENABLED) address inside them.
LS_DEFAULT_BANNED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "233.252.0.0/24",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:0000::/32",
    "2001:20::/28",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)
# Addresses Docker gives compose networks by default (172.17-31.x.x, then 192.168.x.x).
DOCKER_NETWORK_ADDRESSES = ("172.17.0.2", "172.18.0.5", "172.31.255.3", "192.168.16.4")


# ------------------------------------------------------------------------------------- Dockerfile
def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continuation line"
    return out


@cache
def stages() -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions (its FROM first), by its name (``FROM ... AS name``)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "FROM":
            named = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert named and named.group(2), f"every stage is named: FROM {args}"
            current = found.setdefault(named.group(2).lower(), [])
        assert current is not None, f"{keyword} before the first FROM"
        current.append((keyword, args))
    return found


def dockerfile(target: str = "serve") -> list[tuple[str, str]]:
    """The instructions an image of ``target`` is built from: its base stages' first, then its own."""
    steps = stages()[target]
    base = steps[0][1].split()[0].lower()
    return (dockerfile(base) if base in stages() else []) + steps


def _env_instructions(target: str = "serve") -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile(target):
        if keyword == "ENV":
            env.update(dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args)))
    return env


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _healthcheck_argv(target: str = "serve") -> list[str] | None:
    checks = [args for keyword, args in dockerfile(target) if keyword == "HEALTHCHECK"]
    if not checks or checks[-1].upper() == "NONE":
        return None
    cmd = re.search(r"(?:^|\s)CMD\s+(.*)$", checks[-1])
    assert cmd, f"HEALTHCHECK without CMD: {checks[-1]}"
    return _exec_form(cmd.group(1))


def _pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project


def _pyproject_pin(name: str) -> str:
    deps = _pyproject()["optional-dependencies"]["train"]
    pins = [d.split("==", 1)[1].strip() for d in deps if re.fullmatch(rf"{name}\s*==.*", d)]
    assert len(pins) == 1, f"pyproject.toml's train extra pins {name} {pins}"
    return pins[0]


def _project_extras(target: str) -> set[str]:
    runs = [args for keyword, args in dockerfile(target) if keyword == "RUN"]
    installs = [args for args in runs if re.search(r"pip install [\"']?\.(\[|[\"'\s]|$)", args)]
    assert len(installs) == 1, f"expected one `pip install .[...]` in {target}, got {installs}"
    extras = re.search(r"\.\[([^\]]*)\]", installs[0])
    assert extras, installs[0]
    return set(extras.group(1).split(","))


def test_the_serve_image_has_no_pytorch():
    """Serving needs no PyTorch (ONNX Runtime): nothing installs it, the project's own dependencies do
    not name it, and the build fails if it got in anyway."""
    assert stages()["runtime"][0] == ("FROM", "python:3.11-slim AS runtime")
    assert dockerfile("serve")[0] == ("FROM", "python:3.11-slim AS runtime")
    assert _project_extras("serve") == {"postgres", "queue"}, "serve takes postgres,queue: not train, not dev"
    core = " ".join(_pyproject()["dependencies"])
    assert not re.search(r"\btorch|\bgrad-cam|\bonnxscript", core), "serving's dependencies name PyTorch"
    assert "onnxruntime" in core
    runs = " ".join(args for keyword, args in dockerfile("serve") if keyword == "RUN")
    assert "torch==" not in runs
    assert re.search(r"find_spec\('torch'\).*sys\.exit|sys\.exit\(.*find_spec\('torch'\)", runs), "no check"
    # The release comes from the worker stage, which wrote the lesion pair's graphs into it.
    copies = [args for keyword, args in dockerfile("serve") if keyword == "COPY"]
    assert copies == [
        "--from=sources /src /src",
        "--from=worker /opt/dermassist/models /opt/dermassist/models",
    ]
    worker_runs = " ".join(args for keyword, args in dockerfile("worker") if keyword == "RUN")
    assert "tools/release.py graphs /opt/dermassist/models --all" in worker_runs


def test_the_worker_image_installs_cpu_torch_before_the_project():
    steps = dockerfile("worker")
    assert steps[0] == ("FROM", "python:3.11-slim AS runtime"), steps[0]
    assert _project_extras("worker") == {"postgres", "queue", "train"}
    runs = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "RUN"]
    # RUNs that name torch or torchvision to pip install (not the project, which depends on them).
    torch_runs = [(i, args) for i, args in runs if re.search(r"pip install[^&;|]*\btorch(vision)?==", args)]
    project_runs = [(i, args) for i, args in runs if re.search(r"pip install [\"']?\.(\[|[\"'\s]|$)", args)]
    assert torch_runs, "no RUN installs torch"
    project_at, _ = project_runs[0]
    first_torch_at, torch_args = torch_runs[0]
    assert first_torch_at < project_at, "torch must be installed before the project, or pip takes CUDA wheels"
    assert f"--index-url {CPU_INDEX}" in torch_args, torch_args
    for name in ("torch", "torchvision"):
        assert f"{name}=={_pyproject_pin(name)}" in torch_args, f"{name} not at pyproject.toml's pin"
    for _, args in torch_runs:
        assert f"--index-url {CPU_INDEX}" in args, f"a torch install bypasses the CPU index: {args}"
    # The sources come after the torch layer, so editing code does not reinstall PyTorch.
    copies = [i for i, (keyword, _) in enumerate(steps) if keyword == "COPY"]
    assert copies and min(copies) > first_torch_at


@pytest.mark.parametrize("target", ["serve", "worker"])
def test_dockerfile_runs_as_a_non_root_user(target):
    steps = dockerfile(target)
    users = [(i, args.split(":")[0]) for i, (keyword, args) in enumerate(steps) if keyword == "USER"]
    assert users, "no USER: the backend would run as root"
    at, user = users[-1]
    assert user not in ("root", "0"), f"the last USER is {user}"
    created = " ".join(args for keyword, args in steps[:at] if keyword == "RUN")
    made = re.search(r"useradd\b[^&;]*?--uid\s+(\d+)[^&;]*?\s([a-z_][a-z0-9_-]*)\s*(?:&&|;|$)", created)
    assert made, "the image creates no user with useradd --uid"
    assert user in made.groups(), f"USER {user} is not the user the Dockerfile creates ({made.groups()})"
    assert not any(keyword == "USER" for keyword, _ in steps[at + 1 :])


@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("serve", ["dermassist", "serve", "--host", "0.0.0.0", "--port", "9090"]),
        ("worker", ["dermassist", "worker"]),
    ],
)
def test_dockerfile_settings_volume_port_and_command(target, command):
    steps = dockerfile(target)
    env = _env_instructions(target)
    assert env.get("MODEL_DIR") == "/data/models"
    assert env.get("THREADS") == "1"
    volumes = [v for keyword, args in steps if keyword == "VOLUME" for v in _exec_form(args)]
    assert env["MODEL_DIR"] in volumes, "MODEL_DIR must be a volume: promoted models outlive the container"
    assert (("EXPOSE", "9090") in steps) == (target == "serve")
    cmds = [args for keyword, args in steps if keyword == "CMD"]
    assert _exec_form(cmds[-1]) == command
    assert (_healthcheck_argv(target) is not None) == (target == "serve"), "only serve answers /health"
    # Only the released models are baked in (the folder with their SHA-256 manifest): nothing copies
    # single checkpoints or run folders, nothing downloads.
    for keyword, args in steps:
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.(pt|pth|ckpt|onnx)\b|\bruns\b|https?://", args), f"{keyword} {args}"
    copied = {
        _exec_form(args)[-1] if args.startswith("[") else args.split()[-1]: args
        for k, args in dockerfile("worker")
        if k == "COPY"
    }
    assert env.get("RELEASE_DIR") in copied and copied[env["RELEASE_DIR"]].split()[0] == "models"
    assert ("COPY", "--from=sources /src /src") in steps, (
        "the project's sources, as the sources stage has them"
    )


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health" else 404
        body = b'{"status": "UP"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthcheck_asks_health_with_python_and_fails_when_the_backend_does(health_server):
    argv = _healthcheck_argv()
    assert argv is not None, "the Dockerfile has no HEALTHCHECK"
    # python:3.11-slim has neither curl nor wget.
    assert argv[0] in ("python", "python3"), f"the health check runs {argv[0]}, which slim lacks"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(argv))
    assert len(urls) == 1, urls
    url = urlsplit(urls[0])
    assert url.path == "/health"
    assert url.hostname in ("127.0.0.1", "localhost") and url.port == 9090, "not the port CMD serves on"

    def run(port: int) -> int:
        here = [a.replace(f"{url.hostname}:9090", f"127.0.0.1:{port}") for a in argv]
        return subprocess.run([sys.executable, *here[1:]], capture_output=True, timeout=30).returncode

    up_port = health_server.server_address[1]
    assert run(up_port) == 0
    _Health.status = 503
    try:
        assert run(up_port) != 0, "a failing /health must fail the check"
    finally:
        _Health.status = 200
    assert run(_free_port()) != 0, "a backend that does not answer must fail the check"


# ---------------------------------------------------------------------------------- .dockerignore
def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excluding, pattern) in order; the last rule matching a path or one of its parents wins."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        glob = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + glob[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        rules.append((not include, re.compile(regex)))
    return rules


def _excluded(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for excluding, pattern in _ignore_rules():
        if any(pattern.fullmatch(p) for p in prefixes):
            verdict = excluding
    return verdict


def test_dockerignore_keeps_environments_outputs_and_caches_out():
    assert DOCKERIGNORE.is_file(), "a root .dockerignore (the build context is the repository root)"
    for path in (
        ".venv/bin/python",
        "runs/demo/dermassist.sqlite",
        "data/x.jpg",
        "shared/data/derm-dev/labels.csv",
        ".git/HEAD",
        ".mypy_cache/x",
        ".pytest_cache/x",
        ".ruff_cache/x",
        "dermassist.egg-info/PKG-INFO",
        "backend/__pycache__/app.cpython-311.pyc",
        "model/best.pt",
    ):
        assert _excluded(path), f"{path} would be sent to the Docker build"
    copied = [
        args.split()[0]
        for target in stages()
        for keyword, args in stages()[target]
        if keyword == "COPY" and not args.startswith("--from")
    ]
    assert copied and "tools/release.py" in copied
    for source in copied:
        assert not _excluded(source.rstrip("/")), f"the Dockerfile copies {source}, which .dockerignore drops"
    assert not _excluded("models/dermnet-bcc.pt") and not _excluded("models/release.json")
    for path in (
        "backend/api/app.py",
        "consensus/migrations/versions/0001_initial_schema.py",
        "labeling_config/bcc.xml",
    ):
        assert not _excluded(path), f"{path} is needed in the image"


# ----------------------------------------------------------------------------------------- compose
@cache
def docker_compose() -> tuple[list[str], dict[str, str]] | None:
    """The `docker compose` command and a clean environment for it, or None where it cannot run."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    # The file's own defaults, not whatever this shell or a local docker/.env sets.
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    try:
        version = subprocess.run([docker, "compose", "version"], capture_output=True, env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if version.returncode != 0:
        return None
    return [docker, "compose", "--env-file", os.devnull, "-f", str(COMPOSE)], env


def _interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} / $$ with no variable set."""
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if not isinstance(value, str):
        return value
    pattern = r"\$\$|\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}"
    return re.sub(pattern, lambda m: "$" if m.group(0) == "$$" else (m.group(1) or ""), value)


@cache
def compose() -> dict[str, Any]:
    """The compose model: `docker compose config --format json` where it runs, else the YAML."""
    cli = docker_compose()
    if cli is not None:
        command, env = cli
        out = subprocess.run(
            [*command, "config", "--format", "json"], capture_output=True, text=True, env=env, timeout=60
        )
        assert out.returncode == 0, out.stderr
        model: dict[str, Any] = json.loads(out.stdout)
        return model
    try:
        import yaml
    except ImportError:
        pytest.skip("neither `docker compose` nor PyYAML is available to read docker/docker-compose.yml")
    return dict(_interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))))


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"no service {name!r} in docker/docker-compose.yml"
    return dict(services[name])


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_on(name: str) -> dict[str, str]:
    deps = service(name).get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}


def mounts(name: str) -> dict[str, str]:
    """Container path -> volume name or host path."""
    out = {}
    for volume in service(name).get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        out[target] = source
    return out


def builds_our_dockerfile(name: str) -> str | None:
    """The target of our Dockerfile that service ``name`` builds (None: it builds none)."""
    build = service(name).get("build")
    if isinstance(build, str) or not build:
        return None
    context = Path(COMPOSE.parent, build.get("context", ".")).resolve()
    if (context / build.get("dockerfile", "Dockerfile")).resolve() != DOCKERFILE.resolve():
        return None
    return str(build.get("target") or list(stages())[-1])


def healthcheck(name: str) -> str | None:
    """'compose', 'image' (our Dockerfile's HEALTHCHECK) or None when the service has none."""
    check = service(name).get("healthcheck")
    if check:
        if check.get("disable") or check.get("test") in (["NONE"], "NONE"):
            return None
        if check.get("test"):
            return "compose"
    target = builds_our_dockerfile(name)
    return "image" if target and _healthcheck_argv(target) is not None else None


def test_docker_compose_config_accepts_the_file():
    cli = docker_compose()
    if cli is None:
        pytest.skip(
            "no `docker compose` here (docker CLI or its compose plugin absent); the YAML checks still ran"
        )
    command, env = cli
    # `config` only reads and resolves the file: no Docker engine is needed (none runs here).
    out = subprocess.run([*command, "config", "--quiet"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "variable is not set" not in out.stderr, out.stderr  # every ${VAR} has its default


def test_the_five_services():
    assert set(compose()["services"]) >= SERVICES


def test_backend_serves_without_pytorch_and_the_worker_trains_with_it():
    backend, worker = service("backend"), service("worker")
    assert builds_our_dockerfile("backend") == "serve" and builds_our_dockerfile("worker") == "worker"
    assert backend.get("image") != worker.get("image"), "two images, two tags"
    assert environment("backend").get("REDIS_URL"), "the serve image cannot train: jobs go to the worker"
    assert list(worker.get("command") or []) == ["dermassist", "worker"]
    assert not backend.get("command"), "the backend runs the image's CMD (dermassist serve on 0.0.0.0)"
    assert service("label-studio")["image"] == "heartexlabs/label-studio:1.23.2"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_label_studio_url_is_the_service_not_localhost(name):
    url = urlsplit(environment(name).get("LABEL_STUDIO_URL", ""))
    host = url.hostname or ""
    assert host not in ("localhost", "0.0.0.0", "") and not host.endswith(".localhost"), url.geturl()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    assert ip is None or not (ip.is_loopback or ip.is_unspecified), url.geturl()
    assert host == "label-studio", f"{name} must reach Label Studio by its service name, got {host}"
    assert (url.port or 80) == 8080


def test_backend_and_worker_share_settings_store_queue_and_models():
    from backend.settings import Settings

    envs = {name: environment(name) for name in APP_SERVICES}
    assert envs["backend"] == envs["worker"], "the worker must see what the backend sees"
    settings = Settings.from_env(envs["backend"])  # raises on a value the backend cannot use
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert urlsplit(settings.database_url).hostname == "postgres"
    assert settings.redis_url and urlsplit(settings.redis_url).hostname == "redis"
    assert settings.label_studio_api_key
    assert settings.threads == 1
    model_dir = str(settings.model_dir)
    assert model_dir == _env_instructions()["MODEL_DIR"]
    sources = {mounts(name).get(model_dir) for name in APP_SERVICES}
    assert len(sources) == 1 and None not in sources, f"MODEL_DIR is not one shared volume: {sources}"
    token = environment("label-studio").get("LABEL_STUDIO_USER_TOKEN")
    assert token == settings.label_studio_api_key, "the key must be the token Label Studio gives its admin"


def test_backend_has_a_health_check_and_the_worker_does_not_inherit_it():
    assert healthcheck("backend") is not None
    # The worker serves no HTTP: the image's check would mark it unhealthy forever.
    assert healthcheck("worker") is None


def test_depends_on_waits_for_health_where_there_is_a_check():
    assert healthcheck("postgres") == "compose"
    assert healthcheck("redis") == "compose"
    assert set(depends_on("backend")) >= {"postgres", "redis"}
    assert set(depends_on("worker")) >= {"postgres", "redis", "backend"}, "the backend migrates the store"
    assert "postgres" in depends_on("label-studio")
    for name in compose()["services"]:
        for target, condition in depends_on(name).items():
            if healthcheck(target) is not None:
                assert condition == "service_healthy", f"{name} -> {target}: {condition}"
    assert mounts("postgres").get("/var/lib/postgresql/data"), "postgres needs a named volume"


def test_label_studio_uses_postgres_and_legacy_tokens():
    env = environment("label-studio")
    assert env.get("DJANGO_DB") == "default"
    assert env.get("POSTGRE_HOST") == "postgres"
    assert env.get("POSTGRE_PASSWORD") == environment("postgres").get("POSTGRES_PASSWORD")
    assert env.get("POSTGRE_USER") == environment("postgres").get("POSTGRES_USER")
    assert env.get("LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN") == "true"
    assert env.get("LABEL_STUDIO_USERNAME") and env.get("LABEL_STUDIO_PASSWORD")
    assert env.get("LOCAL_FILES_SERVING_ENABLED") == "true"


def _ls_setting(env: dict[str, str], name: str) -> str | None:
    for key in (f"LABEL_STUDIO_{name}", f"HEARTEX_{name}", name):  # Label Studio's get_env() order
        if key in env:
            return env[key]
    return None


def _ls_bool(env: dict[str, str], name: str, default: bool) -> bool:
    value = _ls_setting(env, name)
    if value is None:
        return default
    assert value.lower() in ("true", "yes", "on", "1", "false", "no", "not", "off", "0"), f"{name}={value}"
    return value.lower() in ("true", "yes", "on", "1")


def _ls_refuses(env: dict[str, str], address: str) -> bool:
    subnets = list(LS_DEFAULT_BANNED) if _ls_bool(env, "USE_DEFAULT_BANNED_SUBNETS", True) else []
    extra = _ls_setting(env, "USER_ADDITIONAL_BANNED_SUBNETS")
    subnets += extra.split(",") if extra else []
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(subnet) for subnet in subnets)


def test_label_studio_can_call_the_backend_and_still_blocks_loopback_and_metadata():
    env = environment("label-studio")
    assert _ls_refuses({}, "172.18.0.5"), "Label Studio's own defaults refuse Docker's networks"
    ml_checked = _ls_bool(env, "ML_BLOCK_LOCAL_IP", True)
    webhooks_checked = _ls_bool(env, "SSRF_PROTECTION_ENABLED", True)
    if ml_checked or webhooks_checked:
        for address in DOCKER_NETWORK_ADDRESSES:
            assert not _ls_refuses(env, address), (
                f"Label Studio would refuse http://backend:9090 at {address}"
            )
        for address in ("127.0.0.1", "169.254.169.254", "::1", "0.0.0.0"):
            assert _ls_refuses(env, address), f"{address} must stay blocked for Label Studio's requests"


def test_secrets_are_interpolated_with_placeholder_defaults():
    raw = COMPOSE.read_text(encoding="utf-8")
    for key in (
        "LABEL_STUDIO_API_KEY",
        "LABEL_STUDIO_USER_TOKEN",
        "LABEL_STUDIO_PASSWORD",
        "POSTGRES_PASSWORD",
        "POSTGRE_PASSWORD",
        "BASIC_AUTH_PASS",
    ):
        lines = re.findall(rf"^\s*{key}:\s*(.+)$", raw, flags=re.MULTILINE)
        assert lines, f"{key} is not set in docker/docker-compose.yml"
        for value in lines:
            assert value.startswith("${"), f"{key} is hard-coded ({value}); use ${{VAR:-placeholder}}"
    assert "postgres" in environment("backend")["DATABASE_URL"]
    assert re.search(r"\$\{POSTGRES_PASSWORD:-[^}]+\}@postgres:5432/", raw), "DATABASE_URL's password"
