#!/usr/bin/env bash
# Start, stop and inspect the fine-tuning container (Jupyter Lab + TensorBoard); see `./start_docker.sh help`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
COMPOSE_FILE="$ROOT/docker-compose-finetune.yml"
PROJECT=ag-news-finetune
SERVICE=finetune
TOKEN_FILE="$ROOT/.jupyter_token"
JUPYTER_PORT="${JUPYTER_PORT:-8888}"
TENSORBOARD_PORT="${TENSORBOARD_PORT:-6006}"
# The host address both ports are published on (the compose file's default too): loopback, since TensorBoard has no
# login. Reach them from elsewhere through an SSH tunnel, or set 0.0.0.0 (every interface) or one interface's address.
BIND_ADDRESS="${BIND_ADDRESS:-127.0.0.1}"
export JUPYTER_PORT TENSORBOARD_PORT BIND_ADDRESS

usage() {
  cat <<USAGE
Usage: ./start_docker.sh <command>

  start [finetune]      start Jupyter Lab (:$JUPYTER_PORT) and TensorBoard (:$TENSORBOARD_PORT) on all GPUs,
                        published on $BIND_ADDRESS
  stop                  stop the container and any other container of this project
  status                show the container and the Jupyter URL
  logs [finetune] [-f]  print the container log (-f: follow it)
  shell                 open bash inside the running container
  help                  show this text

Environment: JUPYTER_TOKEN (default: generated, kept in .jupyter_token), JUPYTER_PORT,
TENSORBOARD_PORT, BIND_ADDRESS (default 127.0.0.1; 0.0.0.0 publishes both ports on every
interface, TensorBoard without any login), HF_HOME, HF_TOKEN, AG_NEWS_DIR, FINETUNE_IMAGE,
SKIP_GPU_CHECK=1.

From another machine, tunnel both ports:
  ssh -L $JUPYTER_PORT:localhost:$JUPYTER_PORT -L $TENSORBOARD_PORT:localhost:$TENSORBOARD_PORT <this host>
USAGE
}

die() {
  echo "error: $*" >&2
  exit 1
}

usage_error() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

require_docker() {
  command -v docker >/dev/null || die "docker not found: install Docker Engine (https://docs.docker.com/engine/install/)"
  # Asked once: the runtimes double as the daemon check and the GPU check.
  RUNTIMES="$(docker info --format '{{json .Runtimes}}' 2>/dev/null)" ||
    die "the Docker daemon is not running or not reachable: start it (sudo systemctl start docker) or add yourself to the docker group"
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
  else
    die "Docker Compose not found: install the plugin (apt-get install docker-compose-plugin)"
  fi
  COMPOSE+=(-f "$COMPOSE_FILE" -p "$PROJECT")
}

require_nvidia_runtime() {
  [[ "${SKIP_GPU_CHECK:-0}" == 1 || "$RUNTIMES" == *'"nvidia"'* ]] && return
  die "Docker has no NVIDIA runtime: install the NVIDIA Container Toolkit and run
  sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker
(if 'docker run --rm --gpus all ubuntu nvidia-smi' already works, set SKIP_GPU_CHECK=1)"
}

# Prints the id of the running container, nothing when it is stopped.
running_container() {
  docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$SERVICE"
}

port_in_use() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(0)  # taken
sys.exit(1)' "$1"
  elif command -v ss >/dev/null; then
    [[ -n "$(ss -Hltn "sport = :$1")" ]]
  else
    return 1 # cannot tell; docker will report the clash
  fi
}

require_free_ports() {
  local name port
  for name in JUPYTER_PORT TENSORBOARD_PORT; do
    port="${!name}"
    ! port_in_use "$port" || die "port $port is already in use: stop what listens there or pick another, e.g. $name=$((port + 1)) ./start_docker.sh start"
  done
}

# The same token across start and status, so the printed URL keeps working; one given in JUPYTER_TOKEN is kept too.
jupyter_token() {
  if [[ -n "${JUPYTER_TOKEN:-}" ]]; then
    (umask 077 && printf '%s' "$JUPYTER_TOKEN" >"$TOKEN_FILE")
  elif [[ ! -s "$TOKEN_FILE" ]]; then
    (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE")
  fi
  cat "$TOKEN_FILE"
}

# The host port a running container publishes for `container_port`, else `fallback` (this shell's setting).
published_port() {
  local mapping
  mapping="$(docker port "$1" "$2/tcp" 2>/dev/null | head -n 1)"
  if [[ -n "$mapping" ]]; then echo "${mapping##*:}"; else echo "$3"; fi
}

print_urls() {
  local host=localhost
  [[ "$BIND_ADDRESS" == 127.* || "$BIND_ADDRESS" == 0.0.0.0 ]] || host="$BIND_ADDRESS"
  echo "Jupyter Lab:  http://$host:$JUPYTER_PORT/lab?token=$(jupyter_token)"
  echo "TensorBoard:  http://$host:$TENSORBOARD_PORT"
  if [[ "$BIND_ADDRESS" != 127.* ]]; then
    echo "warning: published on $BIND_ADDRESS, not only on loopback: anyone who reaches port $TENSORBOARD_PORT" \
      "sees TensorBoard (it has no login); an SSH tunnel keeps both private (./start_docker.sh help)" >&2
  fi
}

cmd_start() {
  [[ "${1:-$SERVICE}" == "$SERVICE" ]] || usage_error "unknown service '$1' (the only one is $SERVICE)"
  require_docker
  require_nvidia_runtime
  JUPYTER_TOKEN="$(jupyter_token)"
  export JUPYTER_TOKEN
  local was_running
  was_running="$(running_container)"
  # A running container holds the ports itself.
  [[ -n "$was_running" ]] || require_free_ports
  # Otherwise Docker creates a missing cache directory owned by root.
  mkdir -p "${HF_HOME:-$HOME/.cache/huggingface}"
  "${COMPOSE[@]}" up -d "$SERVICE"
  if [[ -n "$was_running" ]]; then
    echo "$SERVICE is already running."
  else
    echo "Started $SERVICE; Jupyter answers once requirements.txt is installed (minutes on a first start: ./start_docker.sh logs -f)."
  fi
  print_urls
}

cmd_stop() {
  require_docker
  "${COMPOSE[@]}" stop
  # `compose stop` skips one-off `compose run` containers, which may still hold GPU memory.
  local leftovers
  leftovers="$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT")"
  if [[ -n "$leftovers" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker stop $leftovers >/dev/null
  fi
  echo "Stopped $PROJECT."
}

cmd_status() {
  require_docker
  "${COMPOSE[@]}" ps -a # -a: a container that exited (e.g. a failed pip install) shows as Exited
  local id
  id="$(running_container)"
  if [[ -z "$id" ]]; then
    echo "$SERVICE is not running: ./start_docker.sh start"
    return
  fi
  echo "Health: $(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}unknown{{end}}' "$id")"
  # The ports it was started with, which this shell's JUPYTER_PORT / TENSORBOARD_PORT need not repeat.
  JUPYTER_PORT="$(published_port "$id" 8888 "$JUPYTER_PORT")"
  TENSORBOARD_PORT="$(published_port "$id" 6006 "$TENSORBOARD_PORT")"
  print_urls
}

cmd_logs() {
  local args=(logs)
  while (($#)); do
    case "$1" in
      -f | --follow) args+=(-f) ;;
      "$SERVICE") ;;
      *) usage_error "unknown logs argument '$1'" ;;
    esac
    shift
  done
  require_docker
  "${COMPOSE[@]}" "${args[@]}" "$SERVICE"
}

cmd_shell() {
  require_docker
  [[ -n "$(running_container)" ]] || die "$SERVICE is not running: ./start_docker.sh start"
  "${COMPOSE[@]}" exec "$SERVICE" bash
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    start) cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    shell) cmd_shell ;;
    help | -h | --help) usage ;;
    "") usage_error "no command given" ;;
    *) usage_error "unknown command '$cmd'" ;;
  esac
}

main "$@"
