# Image of the Prefect workers in docker-compose.yml (worker-cpu, worker-gpu): the project installed,
# so that process-pool workers run its flows. TORCH_INDEX_URL picks the torch build: CPU by default,
# a CUDA index for the GPU worker (docker-compose.yml passes GPU_TORCH_INDEX_URL).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# dependencies first (cached while only the code changes), then the code
COPY pyproject.toml README.md requirements.lock ./
COPY embed_factory embed_factory
COPY flows flows
COPY tasks tasks
COPY llm llm
COPY personas personas
COPY prompts prompts
COPY storage storage
COPY ground ground
COPY prefect.yaml* embed-factory.example.toml ./
# EXTRAS="[gpu]" (worker-gpu) adds faiss-gpu; it and faiss-cpu both ship the module `faiss`, so faiss-cpu goes
# and faiss-gpu is reinstalled over the files they shared
ARG EXTRAS=""
# the versions CI tested (requirements.lock, embed_factory/env_lock.py); faiss-gpu is outside the lock
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c requirements.lock ".${EXTRAS}" \
 && if pip show faiss-gpu >/dev/null 2>&1; then \
      pip uninstall -y faiss-cpu \
      && pip install --no-deps --force-reinstall "faiss-gpu==$(pip show faiss-gpu | sed -n 's/^Version: //p')"; \
    fi

# no secrets in the image: every credential comes from the environment at run time.
# Flow runs start in /app (prefect.yaml's pull step); local files (models, export copies) go to /data.
ENV EMBED_FACTORY_PROJECT_DIR=/app
# /home/factory/.cache/huggingface exists in the image so that a new named volume mounted there (compose's
# factory-hf-cache) starts owned by `factory`
RUN useradd --create-home --uid 10001 factory && mkdir -p /data /home/factory/.cache/huggingface \
 && chown factory /data && chown -R factory /home/factory/.cache
USER factory
