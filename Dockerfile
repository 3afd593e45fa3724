# The sitn-stream application image: `sitn run` (the driver), `sitn serve` (a serving replica) and the Ray
# head and worker nodes all run from it (docker-compose.yml). Kafka runs in its own apache/kafka image, so
# there is no JRE here.
#
#   docker build -t sitn-stream:0.1.0 .
#
# Image size: requirements.lock pins torch from PyPI, and PyPI's Linux x86_64 torch wheel depends on the
# CUDA runtime wheels (nvidia-cublas, -cudnn, -nccl, ... all in the lock), so the image is several GB
# although nothing here uses a GPU. A CPU-only image (torch from download.pytorch.org/whl/cpu, a few
# hundred MB) needs its own lock file; the lock is shared with the tests and benchmarks, so this image uses
# it unchanged. The lock was compiled for x86_64-manylinux_2_28: the image is linux/amd64 only.
#
# The data set is never copied in: compose mounts ../shared/data read-only at /data.
# Send a small build context: COPY takes only the project's packages, but the context is the whole
# checkout (var/ holds run state).

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /app

# Dependencies first (their layer is reused until the lock changes). pip compiles bytecode while it
# installs: a Ray worker that compiles on first import can trip Ray's start-up timeouts (infra/bootstrap.sh).
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

# The project itself, without re-resolving dependencies. Editable, i.e. run from /app: the packages carry
# data files (sitn/dashboard.html) that pyproject.toml declares no package-data for, so a wheel would
# leave them out.
COPY pyproject.toml README.md ./
COPY sitn ./sitn
COPY stream ./stream
COPY learner ./learner
COPY serving ./serving
COPY infra ./infra
RUN pip install --no-cache-dir --no-deps -e . \
    && pip check \
    && python -c "import sitn.cli, sitn.dashboard; assert sitn.dashboard.PAGE.is_file()"

# An unprivileged user. /targets (Prometheus file_sd) and /state (run directory: checkpoints, drift log)
# exist here owned by it, so the named volumes compose mounts there start out writable by it.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin sitn \
    && mkdir -p /targets /state \
    && chown sitn:sitn /targets /state
USER sitn
WORKDIR /home/sitn

# 8000: HTTP API of `sitn serve`; 9400: the driver's /metrics and /dashboard (SITN_METRICS_DASHBOARD_PORT);
# 6379: Ray GCS on the head node.
EXPOSE 8000 9400 6379

ENTRYPOINT ["sitn"]
CMD ["--help"]
