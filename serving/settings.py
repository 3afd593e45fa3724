"""Serving settings: one frozen, typed object per process, read from ``SITN_SERVING_*`` variables.

Only the entry point constructs it (``ServingSettings()`` reads the environment); library code
receives it as an argument. Fields owned by another layer are not here: the broker address and the updates
topic are the stream's (``stream.settings``); ``dim`` and ``cooc_max_neighbours`` are set by the
composition root from the learner's settings (``sitn.settings`` lists the owners).

>>> settings = ServingSettings(admin_token="0123456789abcdef", port=9000)
>>> settings.host, settings.port, str(settings.admin_token)
('127.0.0.1', 9000, '**********')
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS

MIN_TOKEN_CHARS = 16


class ServingSettings(BaseSettings):
    """Settings for ``sitn serve``; every field can be set as ``SITN_SERVING_<NAME>``."""

    # hide_input_in_errors: a validation error would otherwise echo the input, a too-short token included.
    model_config = SettingsConfigDict(
        env_prefix="SITN_SERVING_", frozen=True, extra="forbid", hide_input_in_errors=True
    )

    host: str = Field("127.0.0.1", description="interface to bind; the default keeps the API local")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one")
    admin_token: SecretStr | None = Field(
        None, description=f"bearer token for /admin/* (>= {MIN_TOKEN_CHARS} chars); unset disables admin"
    )
    snapshot_path: Path | None = Field(
        None, description="file that /admin/snapshot writes and /admin/reload reads"
    )
    # Derived: `sitn run` and `sitn serve` set it from the learner's width (SITN_RUN_LEARNER_DIM); the default
    # is for code that builds a service directly (tests, benchmarks).
    dim: int = Field(64, ge=1, le=4096, description="embedding dimension D, the learner's")
    # HNSW32/efSearch=128: see bench/bench_index.py and the chosen-index note in serving/index.py.
    index_factory: str = Field("HNSW32", description="FAISS index_factory string for the item index")
    index_search_params: dict[str, int] = Field(
        default_factory=lambda: {"efSearch": 128}, description="FAISS ParameterSpace settings, as JSON"
    )
    # 16384: the delta is searched exactly (about 0.3 ms per view at 16k rows), and each HNSW rebuild of a
    # 64k catalogue costs ~8 s of a core; on a 2-core machine a 4096-row delta rebuilt every few seconds.
    merge_threshold_rows: int = Field(16384, ge=1, description="delta rows that trigger a base rebuild")
    index_background_merge: bool = Field(
        True, description="build a new index base in a background thread; writes never wait for it"
    )
    # 0.25: on issue 12's stream (100k books, most re-published every few seconds) back-to-back HNSW rebuilds
    # took a whole core from the learner on a 2-core machine; the delta, searched exactly, absorbs the wait.
    index_merge_max_duty: float = Field(
        0.25, gt=0, le=1, description="largest share of one core background index builds may take: after "
        "a build of b seconds the next starts b*(1-duty)/duty seconds later at the earliest (1: back to back)")
    max_consumed_per_user: int = Field(500, ge=1, description="consumed items remembered per user")
    workers: int = Field(
        1, ge=1, le=64, description="worker processes on one port (SO_REUSEPORT, Linux), each applying "
        "the updates topic itself")
    cooc_max_neighbours: int = Field(
        DEFAULT_MAX_NEIGHBOURS, ge=0, description="co-occurrence neighbours kept per item (the fused and "
        "co-occurrence rankers; stream.cooccurrence); 0 keeps every pair, unbounded memory. `sitn run` sets it "
        "from its own --cooc-max-neighbours")
    # Bounds memory under an endless stream of new users: ~1 KiB of vectors (V=4, D=64) plus up to
    # max_consumed_per_user ids per user. The least recently updated user is evicted and served by
    # popularity until published again. `sitn run`'s learner keeps as many users (its histories and its mirror
    # of the served users).
    max_users: int = Field(
        1_000_000, ge=1, description="users whose vectors and consumed items are kept (least recently updated evicted)"
    )
    popularity_refresh_s: float = Field(1.0, ge=0, description="popularity re-sort interval under writes")
    update_batch_size: int = Field(512, ge=1, description="updates applied per batch by the consumer")

    @field_validator("admin_token")
    @classmethod
    def _token_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"admin_token must have at least {MIN_TOKEN_CHARS} characters, "
                f"got {len(value.get_secret_value())}"
            )
        return value
