"""Team deployment: docker-compose.yml and the Dockerfile, checked; then the same
topology run for real without Docker: PostgreSQL <- the compose file's `mlflow server`
command and environment (basic auth, proxied artifacts) <- `mcis classify` over HTTP, a
registered ONNX model, and deploy/serve.py.

There is no Docker engine here, and no compose-spec JSON schema in the environment, so the compose
file gets structural checks of what the deployment relies on.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from mcis_cli import engine, tracking
from mcis_cli.cli import app
from mcis_cli.config import load_config
from mcis_cli.tracking import models
from tests import servers

postgres = servers.postgres  # module-scoped fixture
REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
DOCKERFILE = (REPO / "Dockerfile").read_text()
TOY = REPO / "configs" / "toy.yaml"
ADMIN_PASSWORD = "test-admin-pw"
AUTH = importlib.util.find_spec("flask_wtf") is not None  # mlflow[auth], needed by basic-auth
NO_AUTH = "Flask-WTF (mlflow[auth]) is not installed, so `mlflow server --app-name basic-auth` cannot start"
# Keys of the compose specification used here: docker compose rejects a misspelt one, and no
# engine runs here to do so.
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}
SERVICE_KEYS = {"build", "image", "command", "entrypoint", "environment", "env_file", "volumes",
                "ports", "depends_on", "deploy", "healthcheck", "restart", "profiles", "shm_size",
                "working_dir", "user", "networks", "secrets"}
VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    lines = (REPO / "deploy" / "env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (enough for this file)."""
    def one(match: re.Match) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == "-" else ""
    return VARIABLE.sub(one, value)


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume, variables filled from env.example."""
    parts = [interpolate(v, env_example()).split(":") for v in service.get("volumes", [])]
    return [(p[0], p[1], p[2] if len(p) > 2 else "rw") for p in parts]


def dockerfile_stages() -> dict[str, str]:
    """Target name -> the text of that build stage."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+([\w-]+)\s*$", DOCKERFILE, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


# ---- the files ---------------------------------------------------------------------------------
def test_compose_services_and_bindings():
    assert {k for k in COMPOSE if not k.startswith("x-")} <= TOP_LEVEL_KEYS
    services = COMPOSE["services"]
    for name, service in services.items():
        assert service.keys() <= SERVICE_KEYS, f"{name}: {service.keys() - SERVICE_KEYS}"
    assert set(services) == {"postgres", "mlflow", "train", "serve", "serve-inbox"}
    targets = dockerfile_stages()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert service["build"]["target"] in targets, name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for source, _, _ in mounts(service):
            assert source.startswith("./") or source in COMPOSE["volumes"], f"{name}: {source}"
    assert "ports" not in services["postgres"]
    assert ("pgdata", "/var/lib/postgresql/data", "rw") in mounts(services["postgres"])
    for name, service in services.items():  # `up --wait` and `ps` know each one's state
        assert service["healthcheck"]["test"][0] == "CMD", name
    header = (REPO / "docker-compose.yml").read_text().split("\nname:")[0]
    assert "docs/shared-server.md" in header and (REPO / "docs" / "shared-server.md").is_file()


def test_compose_mlflow_is_postgres_backed_authenticated_and_serves_artifacts():
    mlflow = COMPOSE["services"]["mlflow"]
    command = mlflow["command"]
    option = {flag: command[i + 1] for i, flag in enumerate(command[:-1]) if flag.startswith("--")}
    assert command[:2] == ["mlflow", "server"]
    assert option["--backend-store-uri"].startswith("postgresql+psycopg2://mlflow:${POSTGRES_PASSWORD}@postgres:5432/")
    assert option["--app-name"] == "basic-auth"
    assert "--serve-artifacts" in command
    volumes = {target: source for source, target, _ in mounts(mlflow)}
    assert volumes[option["--artifacts-destination"]] in COMPOSE["volumes"]
    assert "mlflow:5000" in option["--allowed-hosts"].split(",")  # the Host header of train and serve
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD")  # from .env, never here
    ini = configparser.ConfigParser()
    ini.read(REPO / "deploy" / "basic_auth.ini")
    assert "admin_password" not in ini["mlflow"]
    auth_db = Path(ini["mlflow"]["database_uri"].removeprefix("sqlite:///"))
    assert volumes[str(auth_db.parent)] in COMPOSE["volumes"], "the user store must outlive the container"
    assert volumes[env["MLFLOW_AUTH_CONFIG_PATH"]] == "./deploy/basic_auth.ini"


def test_compose_gpu_services_log_in_to_the_server():
    for name in ("train", "serve", "serve-inbox"):
        service = COMPOSE["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices), name
        env = service["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env.keys()
        assert service["depends_on"]["mlflow"]["condition"] == "service_healthy"
    train = COMPOSE["services"]["train"]
    assert any(target == "/app/data" and mode == "ro" for _, target, mode in mounts(train))
    command = train["command"]
    assert command[:command.index("mcis")] == ["torchrun", "--standalone", "--nproc_per_node=gpu", "--no-python"]
    config = command[command.index("--config") + 1]
    assert load_config(REPO / config).data.root.startswith("data/")  # under the mount
    # the image's user owns what train writes: its runs volume and its torch cache
    assert {target for _, target, _ in mounts(train)} >= {"/app/runs", "/home/mcis/.cache/torch"}
    inbox = COMPOSE["services"]["serve-inbox"]["command"]
    assert inbox[:2] == ["python", "deploy/serve.py"] and (REPO / inbox[1]).is_file()


def test_compose_serve_is_mlflow_models_serve_on_loopback():
    """The HTTP server test_serving.py runs, on the registered model, published on 127.0.0.1."""
    serve = COMPOSE["services"]["serve"]
    assert serve["build"]["target"] == "serve"  # the torch-free image
    command = [interpolate(str(part), env_example()) for part in serve["command"]]
    option = {flag: command[i + 1] for i, flag in enumerate(command[:-1]) if flag.startswith("-")}
    assert command[:3] == ["mlflow", "models", "serve"]
    assert option["-m"] == "models:/mcis-deeplab@champion" and option["--env-manager"] == "local"
    defaults = [m.group(3) for m in VARIABLE.finditer((REPO / "docker-compose.yml").read_text())
                if m.group(1) == "MCIS_MODEL"]
    assert defaults == ["models:/mcis-deeplab@champion"] * 2  # serve and serve-inbox: never latest
    assert serve["ports"] == [f"127.0.0.1:{option['--port']}:{option['--port']}"]
    assert f"127.0.0.1:{option['--port']}/ping" in serve["healthcheck"]["test"][-1]


def test_env_example_defines_every_required_variable():
    env = env_example()
    text = (REPO / "docker-compose.yml").read_text()
    required = {m.group(1) for m in VARIABLE.finditer(text) if m.group(2) == "?"}
    assert required and required <= env.keys()
    interpolate(text, env)  # raises on a missing one
    for key in (k for k in env if k.endswith("PASSWORD")):
        assert set(env[key]) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_"), f"{key} goes into a URL"
        assert len(env[key]) >= 12, f"{key}: MLflow refuses passwords under 12 characters"


def test_dockerfile_targets():
    stages = dockerfile_stages()
    assert {"cpu", "gpu", "serve", "tracking"} <= stages.keys()
    assert 'pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary' in stages["tracking"]
    assert "python requirements.py pyproject.toml cpu postgres" in stages["cpu-build"]
    assert "pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt" in stages["cpu-build"]
    assert "python requirements.py pyproject.toml gpu postgres" in stages["gpu-build"]
    assert "ARG CUDA_IMAGE=nvidia/cuda:13." in DOCKERFILE and "cudnn-runtime" in DOCKERFILE
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    mlflow_pin = next(p for p in pins if p.startswith("mlflow=="))
    assert f"ARG MLFLOW_VERSION={mlflow_pin.split('==')[1]}" in DOCKERFILE, "server and client must match"
    assert COMPOSE["services"]["mlflow"]["image"].endswith(mlflow_pin.split("==")[1])


def instructions(stage: str) -> list[str]:
    """The instructions of a Dockerfile stage, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", dockerfile_stages()[stage])
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_layers_users_and_the_torch_free_serving_image():
    for build, final in (("cpu-build", "cpu"), ("gpu-build", "gpu")):
        steps = instructions(build)
        deps = next(i for i, step in enumerate(steps) if "-r requirements.txt" in step)
        code = steps.index("COPY mcis_cli mcis_cli")
        assert steps.index("COPY pyproject.toml deploy/requirements.py ./") < deps < code, build
        assert "build-essential" in " ".join(steps)
        steps = instructions(final)
        assert "build-essential" not in " ".join(steps), f"{final} ships compilers"
        assert not [step for step in steps if step.startswith("COPY mcis_cli")], final  # the wheel, built there
        assert any(f"--mount=from={build},source=/wheels" in step for step in steps), final
    for final in ("cpu", "gpu", "serve", "tracking"):
        users = [step.split()[1] for step in instructions(final) if step.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{final} runs as root"
    serve = " ".join(instructions("serve"))
    assert "COPY" not in serve and "torch" not in serve and "mcis_cli" not in serve
    assert f'"{models.ONNXRUNTIME["gpu"]}"' in serve  # the served model's own pin
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f'"{next(p for p in pins if p.startswith("numpy=="))}"' in serve
    assert '"mlflow-skinny==${MLFLOW_VERSION}"' in serve


def test_requirements_script_lists_pyproject_with_the_extras():
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "requirements.py"), str(REPO / "pyproject.toml"),
                           "cpu", "postgres"], capture_output=True, text=True, check=True)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert done.stdout.split("\n")[:-1] == project["dependencies"] + extras["cpu"] + extras["postgres"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".env", "data", "runs"} <= set(ignored)


# ---- the topology, for real --------------------------------------------------------------------
def auth_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}


def http_status(url: str, headers: dict[str, str], payload: dict | None = None) -> int:
    """Status of a GET (or a JSON POST of `payload`)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """docker-compose.yml's mlflow command and environment, with the container paths, host and
    port swapped for local ones (and one worker for this 2-core machine)."""
    cwd = tmp_path_factory.mktemp("team-server")
    backend = postgres.create_database("mlflow")
    service = COMPOSE["services"]["mlflow"]
    ini = configparser.ConfigParser()
    ini.read(REPO / "deploy" / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{cwd / 'basic_auth.db'}"
    with open(cwd / "basic_auth.ini", "w") as f:
        ini.write(f)
    port = servers.free_port()
    command = list(service["command"])
    if not AUTH:  # everything else of the topology still runs
        at = command.index("--app-name")
        del command[at:at + 2]
    local = {"--backend-store-uri": backend, "--artifacts-destination": str(cwd / "artifacts"),
             "--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    for flag, value in local.items():
        command[command.index(flag) + 1] = value
    values = {**env_example(), "MLFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD}
    env = {k: interpolate(str(v), values) for k, v in service["environment"].items()}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(cwd / "basic_auth.ini")
    server = servers.MlflowServer(backend, cwd, port=port, env=env,
                                  command=[sys.executable, "-m", *command]).start()
    yield server
    server.stop()


@pytest.fixture
def logged_in(team_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    return team_server


@pytest.mark.slow
@pytest.mark.skipif(not AUTH, reason=NO_AUTH)
def test_team_server_needs_a_login_and_checks_the_host(team_server, monkeypatch):
    url = team_server.uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(team_server.uri + "/health", {}) == 200  # what the compose healthcheck hits
    assert http_status(url, {}) == 401
    assert http_status(url, auth_header("admin", "wrong")) == 401
    assert http_status(url, auth_header("admin", ADMIN_PASSWORD)) == 200
    assert http_status(url, {**auth_header("admin", ADMIN_PASSWORD), "Host": "mlflow:5000"}) == 200
    assert http_status(url, {**auth_header("admin", ADMIN_PASSWORD), "Host": "evil.example"}) == 403

    # the account commands of the README's shared-server section: a new user reads everything, writes where granted
    admin, alice = auth_header("admin", ADMIN_PASSWORD), auth_header("alice", "alice-password-1")
    api = team_server.uri + "/api"
    assert http_status(f"{api}/2.0/mlflow/users/create", admin, {"username": "alice", "password": "alice-password-1"}) == 200
    experiment = servers.json_request(f"{api}/2.0/mlflow/experiments/create", {"name": "admins"}, admin)
    new_run = {"experiment_id": experiment["experiment_id"]}
    assert http_status(url, alice) == 200
    assert http_status(f"{api}/2.0/mlflow/runs/create", alice, new_run) == 403
    grant = {"username": "alice", "resource_type": "experiment",
             "resource_id": experiment["experiment_id"], "permission": "EDIT"}
    assert http_status(f"{api}/3.0/mlflow/users/permissions/grant", admin, grant) == 200
    assert http_status(f"{api}/2.0/mlflow/runs/create", alice, new_run) == 200

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    result = CliRunner().invoke(app, ["localize", "--config", str(TOY)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "refused the login" in result.output and "MLFLOW_TRACKING_PASSWORD" in result.output


@pytest.mark.slow
def test_training_run_over_http_lands_in_postgres(logged_in, postgres, toy_root, tmp_path):
    """`mcis classify` in a subprocess, as the train container runs it."""
    sets = ["classify.epochs=1", "classify.width=0.125", "classify.input_size=32",
            "classify.batch_size=4", "classify.pretrained=false", f"data.root={toy_root}",
            f"output_dir={tmp_path / 'runs'}", "tracking.experiment=team"]
    command = [sys.executable, "-m", "mcis_cli.cli", "classify", "--config", str(TOY)]
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, cwd=tmp_path, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    mlc = MlflowClient(logged_in.uri)
    run = mlc.search_runs([mlc.get_experiment_by_name("team").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mcis.stage"] == "classify"
    assert run.data.params["classify.epochs"] == "1" and run.data.params["data.root"] == str(toy_root)
    lr = mlc.get_metric_history(run.info.run_id, "lr")
    assert lr and [m.step for m in lr] == list(range(len(lr)))
    assert len(mlc.get_metric_history(run.info.run_id, "loss/total")) == len(lr)
    artifacts = {a.path for a in mlc.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/model.pt" in artifacts
    # the server stored the file itself (proxied artifacts), and PostgreSQL holds the run
    stored = logged_in.cwd / "artifacts" / run.info.experiment_id / run.info.run_id / "artifacts"
    assert (stored / "checkpoints" / "model.pt").is_file()
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=postgres.port, user=postgres.user, dbname="mlflow") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchall() == [("FINISHED",)]


def segmenter(classes: list[str]):
    """A 1x1-convolution 'segmenter' with the metadata `mcis export` writes (a real network would
    only make the test slower: predict's own tests check the outputs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mcis_cli.data import transforms
    from mcis_cli.stages import export

    k = len(classes)
    weight = np.random.default_rng(0).standard_normal((k, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "weight"], ["logits"])], "segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", k, "h", "w"])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    meta = {"class_names": classes, "num_classes": k, "arch": "vgg16",
            "mean": list(transforms.IMAGENET_MEAN), "std": list(transforms.IMAGENET_STD)}
    helper.set_model_props(model, export.model_metadata(meta, "run0", 18))
    onnx.checker.check_model(model)
    return model


@pytest.mark.slow
def test_serve_segments_new_images_with_the_registered_model(logged_in, toy_root, tmp_path):
    classes = ["background", "circle", "square"]
    cfg = load_config(TOY, [f"output_dir={tmp_path / 'runs'}", f"data.root={toy_root}",
                            "tracking.experiment=team-serve"])
    with engine.stage_run(cfg, "export") as tracker:
        example = np.zeros((1, 3, 32, 32), np.float32)
        info = tracking.log_onnx_model(tracker, segmenter(classes), "model", example, "mcis-deeplab")
    MlflowClient(tracking.tracking_uri()).set_registered_model_alias("mcis-deeplab", "champion", info.registered_model_version)

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(inbox / "street.png")
    (inbox / "broken.jpg").write_bytes(b"not a jpeg")
    for image in inbox.iterdir():  # older than the settle time: fully copied in
        os.utime(image, (image.stat().st_mtime - 60,) * 2)
    done = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "serve.py"), "--model", "models:/mcis-deeplab@champion",
         "--inbox", str(inbox), "--outbox", str(outbox), "--provider", "cpu", "--once",
         "--heartbeat", str(tmp_path / "alive")],
        cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mask = np.array(Image.open(outbox / "street.png"))
    assert mask.shape == (40, 56) and mask.max() < len(classes)
    assert (inbox / "done" / "street.png").is_file()
    assert (inbox / "failed" / "broken.jpg").is_file() and "broken.jpg" in done.stderr
    assert not list(outbox.glob("broken*"))
    assert (tmp_path / "alive").is_file()  # what the compose healthcheck reads
