# syntax=docker/dockerfile:1
# Graft: one image for the API, the Celery worker and the one-shot migration, all `python -m app.cli ...`
# (docker-compose.yml runs each of them from this image).
#
# Build arguments:
#   TORCH_SPEC       the torch requirement, installed before anything else (default torch==2.13.0, the
#                    version Graft is tested with; pyproject.toml accepts >=2.4,<2.15).
#   TORCH_INDEX_URL  the index torch comes from. Empty (the default) means plain PyPI, whose Linux x86_64
#                    torch wheels are built for PyTorch's default CUDA version. GPU images set it to the
#                    PyTorch CUDA index that matches the host's NVIDIA driver, e.g.
#                      docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#                    together with a TORCH_SPEC that index has; https://download.pytorch.org/whl/cpu gives
#                    a much smaller CPU-only image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The service runs as `graft`; /data (GRAFT_HOME) belongs to it, so a new named volume mounted there
# starts out writable by it.
RUN groupadd --system --gid 10001 graft \
 && useradd --system --uid 10001 --gid graft --create-home --home-dir /home/graft \
        --shell /usr/sbin/nologin graft \
 && mkdir -p /data \
 && chown graft:graft /data

# Layer 1, torch: the largest one, rebuilt only when these arguments change. The version installed is
# written down so that the next layers keep it.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/torch-pin.txt

WORKDIR /srv/graft

# Layer 2, the project's dependencies, read from pyproject.toml alone: rebuilt when pyproject.toml
# changes, not on every code change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt -c /tmp/torch-pin.txt

# Layer 3, the code. The wheel holds graft/, ml/, app/ and workers/ only: alembic.ini and migrations/ stay in this
# folder, and every command runs from it (`python -m` puts the working directory first on sys.path), so
# app.cli imports this copy and finds the migrations beside it.
COPY alembic.ini ./
COPY migrations ./migrations
COPY graft ./graft
COPY ml ./ml
COPY workers ./workers
COPY app ./app
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && python -m compileall -q graft ml app workers migrations

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GRAFT_HOME=/data \
    GRAFT_HOST=0.0.0.0

USER graft
VOLUME /data
EXPOSE 8000
CMD ["python", "-m", "app.cli", "api"]
