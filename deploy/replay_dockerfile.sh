#!/usr/bin/env bash
# Replays the CPU Dockerfile's steps where no Docker engine runs: hadolint on the Dockerfile (if
# installed), the build context it COPYs alone, `pip wheel --no-deps .`, then a clean venv with
# "<wheel>[serve,dicom]" and `cxrkit serve` probed over HTTP like the HEALTHCHECK and an orchestrator would.
# The base images and `docker build` itself are not exercised. Usage: bash deploy/replay_dockerfile.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
PORT="${PORT:-18799}"
trap 'rm -rf "$WORK"' EXIT
if command -v hadolint >/dev/null; then hadolint "$REPO/Dockerfile"; echo "hadolint: ok"; fi
mkdir "$WORK/ctx"
cd "$REPO"
cp pyproject.toml CMakeLists.txt README.md LICENSE "$WORK/ctx/"          # the Dockerfile's COPY lines
cp -r csrc cxrkit "$WORK/ctx/"
find "$WORK/ctx" \( -name __pycache__ -o -name "*.so" \) -prune -exec rm -rf {} +
python3 -m venv "$WORK/build-venv"
(cd "$WORK/ctx" && "$WORK/build-venv/bin/pip" wheel -q --no-cache-dir --no-deps --wheel-dir "$WORK/wheels" .)
python3 -m venv "$WORK/venv"
WHEEL="$(ls "$WORK"/wheels/cxrkit-*.whl)"
"$WORK/venv/bin/pip" install -q --no-cache-dir "${WHEEL}[serve,dicom]"
cd "$WORK"
"$WORK/venv/bin/cxrkit" serve --host 127.0.0.1 --port "$PORT" --model cxr29-demo --device cpu > "$WORK/serve.log" 2>&1 &
SP=$!
for _ in $(seq 240); do curl -sf "localhost:$PORT/readyz" >/dev/null && break; sleep 0.5; done
"$WORK/venv/bin/python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$PORT/healthz', timeout=2).status != 200)"
echo "HEALTHCHECK command: ok"
curl -sf "localhost:$PORT/readyz"; echo
"$WORK/venv/bin/python" - "$PORT" <<'PY'
import io, json, sys, urllib.request
import numpy as np
from PIL import Image
buf = io.BytesIO()
Image.fromarray((np.indices((512, 512)).sum(0) % 255).astype(np.uint8)).save(buf, format="PNG")
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/predict", data=buf.getvalue(), method="POST")
d = json.load(urllib.request.urlopen(req, timeout=60))
assert d["error"] is None and d["image_size"] == [512, 512], d
print("POST /v1/predict: ok,", len(d["findings"]), "findings")
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/predict?dicom=sr", data=buf.getvalue(), method="POST")
r = urllib.request.urlopen(req, timeout=60)
assert r.headers["Content-Type"].startswith('multipart/related; type="application/dicom"'), r.headers
print("POST /v1/predict?dicom=sr: ok,", len(r.read()), "bytes of DICOM")
PY
kill -TERM "$SP"; wait "$SP"; echo "cxrkit serve exit after SIGTERM: $?"
