# syntax=docker/dockerfile:1
# i2p2i on an NVIDIA GPU. Build:  docker build -t i2p2i .
# To bake the ~9 GB of weights into the image:  docker build --build-arg PREFETCH_MODELS=1 -t i2p2i .
# Run it with compose.yaml (README: "Quick start").

# torch's wheels carry their own CUDA libraries (nvidia-* packages), so the image needs only what the NVIDIA
# container runtime expects: the small "base" flavour, not the multi-gigabyte "runtime" one. Match its CUDA
# version to the pinned torch's (python -c "import torch; print(torch.version.cuda)"): PyPI's torch 2.14.1 is
# built for CUDA 13.0, which needs NVIDIA driver 580 or newer on the host.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9

FROM ${UV_IMAGE} AS uv

# --- build: Python 3.11 and the virtualenv -------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# Ubuntu 22.04's own Python is 3.10; uv installs a standalone CPython 3.11 under /opt/python.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: they change far less often than the code. pyproject.toml leaves
# torch and others open (torch>=2.4 would take the newest, built for another CUDA); the constraints pin every
# package to the version the tests passed with. After a change to the dependencies, regenerate them from the
# virtualenv `make test` passed in:  .venv/bin/pip freeze --exclude-editable > docker/constraints.txt
COPY pyproject.toml ./
COPY docker/constraints.txt ./docker/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python -r pyproject.toml --extra redis -c docker/constraints.txt
COPY README.md ./
COPY i2p2i_bot ./i2p2i_bot
COPY cogs ./cogs
RUN uv pip install --python /opt/venv/bin/python --no-deps .

# --- the image -----------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
# A C compiler and libc headers: torch.compile's Triton kernels build their launchers with one at run time
# (generate.compile), and inductor compiles C++ for any part of a graph that runs on the CPU. Without them
# every compile fails and the UNet runs uncompiled. About 200 MB, beside several GB of CUDA libraries.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ARG UID=10001
RUN groupadd --system --gid "${UID}" i2p2i \
    && useradd --system --uid "${UID}" --gid i2p2i --create-home --home-dir /home/i2p2i \
        --shell /usr/sbin/nologin i2p2i \
    && mkdir -p /data \
    && chown i2p2i:i2p2i /data
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY config.example.toml ./
COPY --chmod=755 docker/entrypoint.sh ./docker/entrypoint.sh
# Everything the bot writes lives under /data: the database, images, label caches, the model weights and the
# compiled kernels, so a restart reuses them instead of compiling the UNet again for minutes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    I2P2I_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    XDG_CACHE_HOME=/data/cache/xdg \
    TORCHINDUCTOR_CACHE_DIR=/data/cache/torch/inductor \
    TRITON_CACHE_DIR=/data/cache/torch/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER ${UID}:${UID}
# Weights fetched here land in the image's /data, which Docker copies into a new named volume on first use.
ARG PREFETCH_MODELS=0
RUN if [ "${PREFETCH_MODELS}" = "1" ]; then /app/docker/entrypoint.sh fetch-models; fi
VOLUME ["/data"]
# On SIGTERM the bot takes no new jobs and lets the running batch finish (queue.stop_grace_s); give it time
# with compose's stop_grace_period or `docker stop -t`.
STOPSIGNAL SIGTERM
# The bot rewrites /data/health.json every 10 s; this fails when it is stale, the bot is not ready, the
# gateway is down, or the GPU thread or the job runner has died. The start period only keeps failures from
# counting (the first success ends it), and the first start fetches ~9 GB (24 minutes at 50 Mbit/s), embeds
# the labels and may compile the UNet. On a slower link, fetch before the first start (README, Quick start).
HEALTHCHECK --interval=30s --timeout=20s --start-period=30m --retries=3 CMD ["i2p2i", "health"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD []
