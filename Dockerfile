# cxrkit CPU service image: `cxrkit serve` (FastAPI + uvicorn) with the bundled models, ONNX Runtime on the CPU.
#   docker build -t cxrkit-serve .
#   docker run --rm -p 8000:8000 cxrkit-serve                     # cxr29-demo on the CPU
#   docker run --rm -p 8000:8000 cxrkit-serve --model cxr-probe   # any `cxrkit serve` option after the image
# The GPU image is described in deploy/README.md. Demonstration models only: not a medical device.

# -- build: the wheel, with the C++ kernels (cxrkit._C) compiled -----------------------------------
FROM python:3.11-slim AS build
# g++ only builds the extension in this throw-away stage; Debian's current one is what we want
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md LICENSE ./
COPY csrc ./csrc
COPY cxrkit ./cxrkit
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- run: the wheel with its `serve` and `dicom` extras (?dicom=sr outputs), as an unprivileged user ---
FROM python:3.11-slim
COPY --from=build /wheels /wheels
# the versions are the ranges of cxrkit's own dependencies and extras (pyproject.toml)
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/cxrkit-*.whl)" \
 && pip install --no-cache-dir "${WHEEL}[serve,dicom]" \
 && rm -rf /wheels \
 && useradd --create-home --uid 10001 cxrkit \
 && mkdir -p /cache \
 && chown cxrkit /cache
USER 10001
# model and TensorRT engine caches (mount a volume here to keep them across restarts)
ENV CXRKIT_CACHE_DIR=/cache \
    PYTHONUNBUFFERED=1
EXPOSE 8000
# liveness; orchestrators should also probe /readyz (model loaded, queue not saturated)
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# SIGTERM drains in-flight requests (up to --drain-timeout s, 20 by default): give `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cxrkit", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "cxr29-demo", "--device", "cpu"]
