# One image for the Airflow components and the Celery workers (docker-compose.yml).
# CPU build by default; the GPU worker is built with a CUDA torch:
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 worker-gpu
FROM python:3.11.11-slim-bookworm

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The torchvision built against that torch (0.28.0 requires torch==2.13.0), from the same
# index. The GPU worker sets it: image processors then take their fast (tensor) paths,
# e.g. OWLv2's pad-and-resize (0.45 s per 768-px keyframe on the CPU path) and Qwen's
# full AutoProcessor. Empty: none (the CPU image; processors fall back to PIL).
ARG TORCHVISION_SPEC=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    HF_HOME=/models \
    OPENSUBJECT_BACKENDS__MODELS_DIR=/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# curl for health checks; libglib for OpenCV's headless build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/opensubject
COPY requirements.txt pyproject.toml README.md ./
# torch first (CPU or CUDA wheel), then the pinned set, then scenedetect without its
# opencv-python extra (it would replace the contrib cv2 build the stages use).
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" ${TORCHVISION_SPEC:+"${TORCHVISION_SPEC}"} \
 && pip install -r requirements.txt \
 && pip install --no-deps scenedetect==0.7.2

COPY opensubject_tasks ./opensubject_tasks
COPY sql ./sql
COPY dags ./dags
COPY plugins ./plugins
RUN pip install --no-deps -e .

# Not root: Celery refuses to run tasks as root unless forced, and nothing here needs it.
RUN useradd --uid 50000 --gid 0 --create-home --home-dir /home/opensubject opensubject \
 && mkdir -p /opt/airflow /models \
 && chown -R 50000:0 /opt/airflow /models
USER 50000
