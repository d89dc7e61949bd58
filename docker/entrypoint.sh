#!/usr/bin/env bash
# Container start: add the project's requirements to the NGC image, then serve TensorBoard and Jupyter Lab.
set -euo pipefail

# An empty token would open Jupyter to anyone who can reach the port.
: "${JUPYTER_TOKEN:?is empty: start the container with ./start_docker.sh, which sets it}"

# The image's torch, flash-attn, triton and Transformer Engine are built for its CUDA;
# pinning them to the installed versions stops pip from replacing them with PyPI wheels.
constraints="$(mktemp)"
pip list --format=freeze | grep -iE '^(torch|flash.attn|triton|transformer.engine)' >"$constraints" || true
pip install -r requirements.txt -e ".[gpu]" -c "$constraints" || {
  echo "error: pip install -r requirements.txt -e .[gpu] failed; the image's own packages stay pinned at:" >&2
  sed 's/^/  /' "$constraints" >&2
  echo "on ResolutionImpossible, loosen those pins in requirements.txt or pick another FINETUNE_IMAGE" >&2
  exit 1
}

# The Trainer writes its TensorBoard logs under checkpoints/<run>/. Both servers listen on every interface of the
# container, which only the ports the compose file publishes reach (on the host's 127.0.0.1 unless BIND_ADDRESS says).
mkdir -p checkpoints
tensorboard --logdir checkpoints --host 0.0.0.0 --port 6006 &

exec jupyter lab --ip 0.0.0.0 --port 8888 --no-browser --allow-root \
  --ServerApp.token="$JUPYTER_TOKEN"
