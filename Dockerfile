# Image of the Prefect workers in docker-compose.yml (worker-cpu, worker-gpu): the project installed,
# so that process-pool workers run its flows. TORCH_INDEX_URL picks the torch build: CPU by default,
# a CUDA index for the GPU worker (docker-compose.yml passes GPU_TORCH_INDEX_URL).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# dependencies first (cached while only the code changes), then the code
COPY pyproject.toml README.md ./
COPY embed_factory embed_factory
COPY flows flows
COPY tasks tasks
COPY llm llm
COPY personas personas
COPY prompts prompts
COPY storage storage
COPY ground ground
COPY prefect.yaml* embed-factory.example.toml ./
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" .

# no secrets in the image: every credential comes from the environment at run time.
# Flow runs start in /app (prefect.yaml's pull step); local files (models, export copies) go to /data.
ENV EMBED_FACTORY_PROJECT_DIR=/app
RUN useradd --create-home --uid 10001 factory && mkdir -p /data && chown factory /data
USER factory
