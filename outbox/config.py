"""Typed configuration: one YAML file, environment overrides, secrets from files.

Precedence (highest first): environment variables, the YAML file, defaults.

* ``OUTBOX_CONFIG`` picks the file (the CLI's ``--config/-c`` wins over it). A relative
  ``database:`` in the file is resolved against the file's directory; a relative
  ``OUTBOX_DB`` against the working directory.
* Named overrides: ``OUTBOX_DB``, ``EIA_BASE_URL``, ``EIA_API_KEY``,
  ``GRIDPULSE_BASE_URL``, ``GRIDPULSE_API_KEY``, ``OUTBOX_SINK_URL`` (the PostgreSQL URL
  of ``sink: {kind: postgres}``; it replaces a ``sink.url_file`` of the file).
* Secrets from files (systemd ``LoadCredential``): ``EIA_API_KEY_FILE``,
  ``GRIDPULSE_API_KEY_FILE``, ``OUTBOX_SINK_URL_FILE``.
* Every other setting: ``OUTBOX__<SECTION>__<KEY>`` (double underscores separate
  the path; the value is parsed as a YAML scalar), e.g.
  ``OUTBOX__GRIDPULSE__BATCH_SIZE=1000`` or
  ``OUTBOX__DATASETS__GENERATION__ENABLED=false``.

The whole result is validated once; every problem is reported with its dotted path
in a single :class:`~outbox.errors.ConfigError` (exit code 2). Secrets are
:class:`pydantic.SecretStr`, shown as ``***`` and never written back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from outbox import datasets as table
from outbox.errors import ConfigError
from outbox.normalize import EIA_CODE_PATTERN
from outbox.redact import MASK, database_url_secrets, redact, register_secret

DEFAULT_CONFIG_NAME = "config.yaml"
DEFAULT_BAS = {"PJM": "PJM", "CAISO": "CISO", "MISO": "MISO", "ERCOT": "ERCO", "SPP": "SWPP"}
NAMED_ENV = {
    "OUTBOX_DB": ("database",),
    "EIA_BASE_URL": ("eia", "base_url"),
    "EIA_API_KEY": ("eia", "api_key"),
    "GRIDPULSE_BASE_URL": ("gridpulse", "base_url"),
    "GRIDPULSE_API_KEY": ("gridpulse", "api_key"),
    "OUTBOX_SINK_URL": ("sink", "url"),
}
SECRET_FILE_ENV = {
    "EIA_API_KEY_FILE": ("eia", "api_key"),
    "GRIDPULSE_API_KEY_FILE": ("gridpulse", "api_key"),
    "OUTBOX_SINK_URL_FILE": ("sink", "url"),
}
# A file of notification URLs, one a line (systemd LoadCredential).
NAMED_ENV_PATHS = {"OUTBOX_ALERTS_URLS_FILE": ("alerts", "urls_file")}
GENERIC_PREFIX = "OUTBOX__"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RetryConfig(_Model):
    """Retry budget for one kind of request: attempts include the first try."""

    attempts: int = Field(5, ge=1, le=100)
    initial_backoff_seconds: float = Field(1.0, ge=0)
    max_backoff_seconds: float = Field(60.0, ge=0)
    max_retry_after_seconds: float = Field(300.0, ge=0)


class DatasetConfig(_Model):
    """One dataset: whether to fetch it, and how far back to re-check revisions."""

    enabled: bool = True
    lookback_hours: int = Field(72, ge=0, le=24 * 366)
    publication_lag_hours: int | None = Field(None, ge=0)
    stale_warning_hours: float | None = Field(None, gt=0)
    stale_critical_hours: float | None = Field(None, gt=0)


def _printable_key(value: SecretStr | None) -> SecretStr | None:
    """An API key travels in a header or a query string: printable ASCII, no spaces."""
    if value is not None:
        key = value.get_secret_value()
        if not all(33 <= ord(c) < 127 for c in key):
            raise ValueError(
                "must be printable ASCII without spaces (the key is not shown; check for a "
                "stray accent, quote or line break)"
            )
    return value


class EIAConfig(_Model):
    """EIA Open Data API v2 source."""

    base_url: str = "https://api.eia.gov/v2"
    api_key: SecretStr | None = None

    _api_key_shape = field_validator("api_key")(classmethod(lambda cls, v: _printable_key(v)))
    history_start: datetime = datetime(2025, 1, 1, tzinfo=UTC)
    timeout_seconds: float = Field(60.0, gt=0)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    page_length: int = Field(5000, ge=1, le=5000)
    max_requests_per_second: float = Field(1.0, gt=0, le=5)
    max_requests_per_hour: int = Field(2000, ge=1, le=9000)
    max_burst: int = Field(3, ge=1, le=5)
    """Requests that may start together after a pause (the average stays at
    max_requests_per_second; never more than EIA's 5 in any second)."""
    max_in_flight: int = Field(4, ge=1, le=16)
    """EIA requests a live fetch keeps in flight at once (1: one after another)."""
    retry: RetryConfig = Field(default_factory=RetryConfig)
    verify_tls: bool = True
    backfill_chunk_hours: int = Field(24 * 31, ge=1)
    forecast_horizon_hours: int = Field(48, ge=0, le=24 * 14)
    max_invalid_fraction: float = Field(0.5, ge=0, le=1)
    replay_commit_rows: int = Field(40_000, ge=1)
    replay_commit_seconds: float = Field(1.0, gt=0)
    replay_read_ahead: Literal["process", "thread"] = "process"

    @field_validator("history_start")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _as_utc_hour(value)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)


class GridPulseConfig(_Model):
    """GridPulse ingest API sink (paths per gridpulse-ingest-v1)."""

    base_url: str = "https://gridpulse.example"
    api_key: SecretStr | None = None

    _api_key_shape = field_validator("api_key")(classmethod(lambda cls, v: _printable_key(v)))
    batch_size: int = Field(5000, ge=1, le=5000)
    timeout_seconds: float = Field(60.0, gt=0)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig(attempts=4))
    retry_budget_seconds: float = Field(300.0, ge=0)
    defer_initial_seconds: float = Field(60.0, ge=0)
    defer_max_seconds: float = Field(1800.0, ge=0)
    # Rows in a row GridPulse refuses alone (400/422, one code, none accepted) before a
    # send stops as "GridPulse rejects everything": a real bad row is usually alone and
    # its neighbours pass; three in a row with no row accepted is a broken GridPulse, and
    # each more costs two requests and one more row wrongly dead per run.
    circuit_breaker_rows: int = Field(3, ge=1)
    gzip: bool = True
    send_source_data: bool = False
    verify_tls: bool = True
    worker_id: str = "gridpulse-outbox"

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class SinkConfig(_Model):
    """Where ``outbox send`` delivers: the GridPulse ingest API (``kind: gridpulse``, the
    ``gridpulse`` section) or GridPulse's PostgreSQL database directly (``kind: postgres``,
    exactly one of ``url``/``url_file``; the batch size and retry budget stay those of the
    ``gridpulse`` section)."""

    kind: Literal["gridpulse", "postgres"] = "gridpulse"
    url: SecretStr | None = None
    url_file: str | None = None
    catalog: Literal["open", "fixed"] = "open"
    connect_timeout_seconds: float = Field(10.0, gt=0)
    statement_timeout_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _one_url(self) -> SinkConfig:
        if self.kind == "gridpulse":
            if self.url is not None or self.url_file is not None:
                raise ValueError(
                    "sink.url (OUTBOX_SINK_URL) and sink.url_file are for kind: postgres; "
                    "set sink.kind: postgres (OUTBOX__SINK__KIND=postgres) to use them"
                )
            return self
        if (self.url is None) == (self.url_file is None):
            raise ValueError(
                "kind: postgres needs exactly one of sink.url and sink.url_file "
                "(or OUTBOX_SINK_URL / OUTBOX_SINK_URL_FILE)"
            )
        url = self.url
        if self.url_file is not None:
            url = SecretStr(_read_secret_file("sink.url_file", self.url_file))
        assert url is not None
        text = url.get_secret_value()
        if text.startswith("postgresql+psycopg://"):
            text = "postgresql://" + text.split("://", 1)[1]
        if not text.startswith(POSTGRES_SCHEMES):  # no host: a Unix socket (libpq's default)
            scheme = text.split("://", 1)[0] if "://" in text else ""
            raise ValueError(
                f"sink.url: not a PostgreSQL URL (postgresql://user:password@host/db; "
                f"got scheme {scheme!r})"
            )
        _check_postgres_url(text)
        return self.model_copy(update={"url": SecretStr(text), "url_file": None})

    def require_url(self) -> str:
        """The PostgreSQL URL (only for ``kind: postgres``)."""
        if self.url is None:
            raise ConfigError("sink.url: missing: set sink.url, sink.url_file or OUTBOX_SINK_URL")
        return self.url.get_secret_value()


class StatusConfig(_Model):
    """Thresholds of ``outbox status --check``."""

    oldest_pending_warning_hours: float = Field(6.0, gt=0)
    oldest_pending_critical_hours: float = Field(24.0, gt=0)
    dead_rows_warning: int = Field(1, ge=1)
    dead_rows_critical: int = Field(1000, ge=1)
    failed_runs_warning: int = Field(2, ge=1)
    failed_runs_critical: int = Field(6, ge=1)

    def threshold_pairs(self) -> list[tuple[str, float, str, float]]:
        """(warning key, value, critical key, value) for each pair of thresholds."""
        return [
            (
                f"{name}_warning{unit}",
                getattr(self, f"{name}_warning{unit}"),
                f"{name}_critical{unit}",
                getattr(self, f"{name}_critical{unit}"),
            )
            for name, unit in (("oldest_pending", "_hours"), ("dead_rows", ""), ("failed_runs", ""))
        ]


class AlertsConfig(_Model):
    """Push notifications when the ``--check`` verdict changes (apprise URLs; secrets)."""

    urls: list[SecretStr] = Field(default_factory=list)
    urls_file: str | None = None
    repeat_hours: float | None = Field(None, gt=0)
    timeout_seconds: float = Field(10.0, gt=0, le=120)

    @field_validator("urls")
    @classmethod
    def _shape(cls, value: list[SecretStr]) -> list[SecretStr]:
        for i, url in enumerate(value):
            text = url.get_secret_value()
            if "://" not in text or not text.split("://", 1)[0].isalnum():
                scheme = text.split("://", 1)[0] if "://" in text else ""
                raise ValueError(
                    f"urls[{i}]: not a notification URL (scheme://...; got scheme {scheme!r})"
                )
        return value

    @model_validator(mode="after")
    def _from_file(self) -> AlertsConfig:
        if self.urls_file is None:
            return self
        lines = _read_secret_file("alerts.urls_file", self.urls_file).splitlines()
        found = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        merged = self.urls + [SecretStr(u) for u in found]
        return self.model_copy(update={"urls": AlertsConfig._shape(merged), "urls_file": None})


# 256 MiB: room for what follows a staged page on the same file system - the WAL up to
# its checkpoint interval (10,000 pages, 40 MB), the checkpoint itself, a send's
# acknowledgements and journald - so that a fetch stops (exit 4) before the disk is full.
DEFAULT_MIN_FREE_BYTES = 256 * 1024 * 1024


class HousekeepingConfig(_Model):
    """Retention of acknowledged rows and the outbox size ceiling."""

    retention_days: float = Field(90.0, gt=0, le=36500)
    max_rows: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)
    min_free_bytes: int = Field(DEFAULT_MIN_FREE_BYTES, ge=0)
    """Free space fetch leaves on the outbox's file system (0: no floor)."""


QUALITY_RULES = (
    "balance",
    "interchange_sum",
    "antisymmetry",
    "fuel_sum",
    "repeated_day",
    "flat_line",
    "spike",
    "negative_generation",
    "dropped_series",
    "large_revision",
)
SEVERITIES = ("info", "warn", "crit")


class RuleSettings(_Model):
    """Settings of one quality rule; a field left unset keeps the rule's default.

    Which fields a rule reads is in docs/quality.md: ``tolerance`` is a fraction (of
    demand, of NG, ...), ``min_mw`` an absolute floor in MW, ``threshold`` the rule's
    limit (a z-score, hours, MW, a fraction), ``window_hours`` its window.
    """

    enabled: bool | None = None
    action: Literal["warn", "quarantine"] | None = None
    severity: Literal["info", "warn", "crit"] | None = None
    tolerance: float | None = Field(None, ge=0)
    min_mw: float | None = Field(None, ge=0)
    threshold: float | None = Field(None, ge=0)
    window_hours: int | None = Field(None, ge=1, le=24 * 31)


class RuleConfig(RuleSettings):
    """One rule: its settings, overridden per dataset, then per BA (GridPulse code)."""

    datasets: dict[str, RuleSettings] = Field(default_factory=dict)
    bas: dict[str, RuleSettings] = Field(default_factory=dict)
    exempt_fuels: list[str] | None = None
    """negative_generation: fuels allowed to be negative (storage); default in docs."""

    @field_validator("datasets")
    @classmethod
    def _known(cls, value: dict[str, RuleSettings]) -> dict[str, RuleSettings]:
        unknown = sorted(set(value) - set(table.names()))
        if unknown:
            raise ValueError(f"unknown dataset {unknown[0]!r}; known: {', '.join(table.names())}")
        return value


class QualityConfig(_Model):
    """Data-quality checks on staged rows (outbox/quality, docs/quality.md)."""

    enabled: bool = True
    check_warning_severity: Literal["info", "warn", "crit", "off"] = "crit"
    check_critical_severity: Literal["info", "warn", "crit", "off"] = "off"
    pass_rows: int = Field(250_000, ge=1)
    rules: dict[str, RuleConfig] = Field(default_factory=dict)

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(QUALITY_RULES))
            if unknown:
                raise ValueError(f"unknown rule {unknown[0]!r}; known: {', '.join(QUALITY_RULES)}")
            return {k: (v or {}) for k, v in value.items()}
        return value


class Config(_Model):
    """The whole configuration of one outbox; see config.yaml for every key."""

    database: str = "outbox.db"
    balancing_authorities: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_BAS))
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    eia: EIAConfig = Field(default_factory=EIAConfig)
    gridpulse: GridPulseConfig = Field(default_factory=GridPulseConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    housekeeping: HousekeepingConfig = Field(default_factory=HousekeepingConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    metrics_path: str | None = None
    report_path: str | None = None
    log_format: Literal["logfmt", "json"] = "logfmt"

    @field_validator("database")
    @classmethod
    def _database(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be the path of the outbox file, not empty")
        path = Path(value)
        if path.is_dir():
            raise ValueError(f"{value} is a directory; name the outbox file in it")
        if path.exists() and not path.is_file():
            # /dev/null, a FIFO, a device: SQLite would write its journal beside it
            raise ValueError(f"{value} is not a regular file; name the outbox file")
        return value

    @field_validator("balancing_authorities")
    @classmethod
    def _bas(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one balancing authority is required")
        for code, eia in value.items():
            if not code or not str(eia).strip() or not code.replace("-", "").isalnum():
                raise ValueError(f"{code!r}: {eia!r} is not a GridPulse code: EIA code pair")
        if len(set(value.values())) != len(value):
            raise ValueError("two GridPulse codes map to the same EIA respondent")
        mapped = {code: str(eia).strip().upper() for code, eia in value.items()}
        for code, eia in mapped.items():
            if not re.fullmatch(EIA_CODE_PATTERN, eia):
                raise ValueError(
                    f"{code}: {eia[:40]!r} is not an EIA respondent code "
                    "(1-10 letters and digits, e.g. PJM, CISO)"
                )
        return mapped

    @field_validator("datasets", mode="before")
    @classmethod
    def _datasets(cls, value: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            return value
        unknown = sorted(set(value) - set(table.names()))
        if unknown:
            raise ValueError(f"unknown dataset {unknown[0]!r}; known: {', '.join(table.names())}")
        merged: dict[str, Any] = {}
        for name in table.names():
            given = value.get(name) or {}
            if isinstance(given, Mapping):
                given = {"lookback_hours": table.by_name(name).lookback_hours, **given}
            merged[name] = given
        return merged

    @model_validator(mode="after")
    def _retention_exceeds_lookbacks(self) -> Config:
        longest = max((d.lookback_hours for d in self.datasets.values()), default=0)
        if self.housekeeping.retention_days * 24 <= longest:
            raise ValueError(
                f"housekeeping.retention_days ({self.housekeeping.retention_days:g}) must exceed "
                f"the longest lookback ({longest} h)"
            )
        return self

    @model_validator(mode="after")
    def _warnings_before_criticals(self) -> Config:
        pairs = [
            (f"status.{w}", wv, f"status.{c}", cv) for w, wv, c, cv in self.status.threshold_pairs()
        ]
        for name in table.names():
            ds = self.datasets[name]
            if ds.stale_warning_hours is not None or ds.stale_critical_hours is not None:
                warn, crit = self.stale_thresholds(name)
                key = f"datasets.{name}.stale_"
                pairs.append((f"{key}warning_hours", warn, f"{key}critical_hours", crit))
        problems = [f"{w} ({wv:g}) is past {c} ({cv:g})" for w, wv, c, cv in pairs if wv > cv]
        if problems:
            raise ValueError("; ".join(problems) + ": a warning must come before its critical")
        return self

    # -- derived views -------------------------------------------------------------

    @property
    def eia_to_gridpulse(self) -> dict[str, str]:
        """EIA respondent code -> GridPulse code."""
        return {eia: code for code, eia in self.balancing_authorities.items()}

    def enabled_datasets(self) -> list[str]:
        """Names of the datasets to fetch, in canonical order."""
        return [name for name in table.names() if self.datasets[name].enabled]

    def publication_lag(self, dataset: str) -> int:
        """Expected hours before EIA publishes an hour of ``dataset``."""
        lag = self.datasets[dataset].publication_lag_hours
        return table.by_name(dataset).publication_lag_hours if lag is None else lag

    def stale_thresholds(self, dataset: str) -> tuple[float, float]:
        """(warning, critical) age in hours of the newest staged hour of ``dataset``.

        The config refuses a warning past its critical, defaults included.
        """
        ds = self.datasets[dataset]
        lag = self.publication_lag(dataset)
        warn = ds.stale_warning_hours or float(max(lag, 1) + 6)
        crit = ds.stale_critical_hours or float(max(lag, 1) + 24)
        return warn, crit

    def require_eia_key(self) -> str:
        """The EIA key, or a ConfigError telling how to provide it."""
        if self.eia.api_key is None or not self.eia.api_key.get_secret_value():
            raise ConfigError("eia.api_key: missing: set EIA_API_KEY or EIA_API_KEY_FILE")
        return self.eia.api_key.get_secret_value()

    def require_gridpulse_key(self) -> str:
        """The GridPulse key, or a ConfigError telling how to provide it."""
        key = self.gridpulse.api_key
        if key is None or not key.get_secret_value():
            raise ConfigError(
                "gridpulse.api_key: missing: set GRIDPULSE_API_KEY or GRIDPULSE_API_KEY_FILE"
            )
        return key.get_secret_value()

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets shown as ``***``."""
        data = self.model_dump(mode="json")
        for section in ("eia", "gridpulse"):
            if data[section].get("api_key") is not None:
                data[section]["api_key"] = MASK
        if self.sink.url is not None:  # the host and database shown, the credentials not
            data["sink"]["url"] = redact(self.sink.url.get_secret_value())
        redacted: dict[str, Any] = _redact_strings(data)
        return redacted


def _redact_strings(value: Any) -> Any:
    """Every string inside ``value`` with URL secrets (query keys, userinfo) masked."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v) for v in value]
    return value


def _register_url(url: str) -> None:
    """Mask a notification URL wherever it appears, and the tokens inside it."""
    register_secret(url)
    rest = url.split("://", 1)[-1]
    for part in re.split(r"[/:@?&=#,]", rest):
        # Tokens, passwords and webhook ids; not short words or a host's labels.
        if len(part) >= 8 and "." not in part:
            register_secret(part)


def _register_database_url(url: str) -> None:
    """Mask a database URL's credentials wherever they appear (the password alone too:
    a driver's message may quote it without the URL). Not the whole URL: its host and
    database are shown (its user info is masked wherever a URL appears)."""
    for secret in database_url_secrets(url):
        register_secret(secret)


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_postgres_url(url: str) -> None:
    """A ValueError (credentials masked) for a URL the driver could not use: one libpq
    does not parse (an unknown query parameter, a bad percent-escape), a port out of
    1-65535, an unknown sslmode. Checked only where psycopg is installed (without it the
    sink names its extra)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return
    secrets = database_url_secrets(url)
    try:
        params = conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's parse error
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ValueError(
            f"sink.url: not a usable PostgreSQL URL: {redact(lines[0], secrets)}"
        ) from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError("sink.url: not a usable PostgreSQL URL: the port is not 1-65535")
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise ValueError(
            f"sink.url: not a usable PostgreSQL URL: sslmode {redact(str(sslmode), secrets)!r} "
            f"is not one of {', '.join(_SSLMODES)}"
        )


def _as_utc_hour(value: datetime) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _check_url(value: str) -> str:
    """An http(s) URL without query or fragment (paths are appended to it), no trailing /."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{redact(value)!r} is not an http(s) URL")
    parts = urlsplit(value)
    if parts.query or parts.fragment or value.rstrip("/").endswith(("?", "#")):
        raise ValueError(
            f"{redact(value)!r}: a query string or fragment is not supported "
            "(API paths are appended to this URL; keys go in the *_API_KEY variables)"
        )
    if not parts.hostname:
        raise ValueError(f"{redact(value)!r} has no host")
    return value.rstrip("/")


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read, merge and validate the configuration; raise ConfigError naming every problem."""
    env = os.environ if env is None else env
    file = Path(path) if path else _env_path(env)
    data = _read_yaml(file) if file else {}
    if file:
        _resolve_database(data, file)
    from_env = _apply_env(data, env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file, from_env)) from None
    for secret in (config.eia.api_key, config.gridpulse.api_key):
        if secret is not None:
            register_secret(secret.get_secret_value())
    for url in config.alerts.urls:
        _register_url(url.get_secret_value())
    if config.sink.url is not None:
        _register_database_url(config.sink.url.get_secret_value())
    return config


def _env_path(env: Mapping[str, str]) -> Path | None:
    value = env.get("OUTBOX_CONFIG")
    return Path(value) if value else None


# A config file is a few kilobytes; anything this large is the wrong file.
MAX_CONFIG_BYTES = 1 << 20


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        if file.exists() and not file.is_file():
            # a FIFO or a device would block the read (or never end): not a config file
            raise ConfigError(f"{file}: not a regular file; give the path of a YAML file")
        if file.is_file() and file.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{file}: {file.stat().st_size:,} bytes is not a config file")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{file}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{file}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys, not a {_kind(data)}")
    return data


def _resolve_database(data: dict[str, Any], file: Path) -> None:
    """A relative ``database:`` in a file lies next to that file, from wherever it is run
    (``OUTBOX_DB``, set in the environment, stays relative to the working directory)."""
    value = data.get("database")
    if isinstance(value, str) and value and not Path(value).is_absolute():
        data["database"] = str(file.parent / value)


def _kind(value: object) -> str:
    return type(value).__name__


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Merge the environment into ``data``; return which key each variable set (so that
    an error in a value names the variable it came from, not the file)."""
    from_env: dict[tuple[str, ...], str] = {}
    for name, value in sorted(env.items()):
        if name.startswith(GENERIC_PREFIX) and len(name) > len(GENERIC_PREFIX):
            parts = name[len(GENERIC_PREFIX) :].split("__")
            path = tuple(part.lower() for part in parts)
            if path[0] == "balancing_authorities" and len(path) > 1:
                _set_ba(data, tuple(parts[1:]), _scalar(value), name)
                from_env[("balancing_authorities",)] = name
            else:
                _set_path(data, path, _scalar(value), name)
                from_env[path] = name
    for name, path in NAMED_ENV.items():
        if env.get(name):
            _set_path(data, path, env[name], name)
            from_env[path] = name
    for name, path in SECRET_FILE_ENV.items():
        if env.get(name):
            _set_path(data, path, _read_secret_file(name, env[name]), name)
            from_env[path] = name
    if ("sink", "url") in from_env and isinstance(data.get("sink"), dict):
        data["sink"].pop("url_file", None)  # the variable replaces the file's url_file
    for name, path in NAMED_ENV_PATHS.items():
        if env.get(name):
            _set_path(data, path, env[name], name)
            from_env[path] = name
    return from_env


def _scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any, source: str) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set {'.'.join(path)}: {key} is not a section")
        node = child
    node[path[-1]] = value


def _set_ba(data: dict[str, Any], path: tuple[str, ...], value: Any, source: str) -> None:
    """``OUTBOX__BALANCING_AUTHORITIES__<CODE>``: one entry merged into the map.

    GridPulse codes are case-sensitive, so the code keeps the case it is written in (an
    existing entry that differs only in case is replaced); the map it merges into is the
    file's, else the defaults. An empty value removes the entry.
    """
    if len(path) != 1 or not path[0]:
        raise ConfigError(
            f"{source}: balancing_authorities entries are GridPulse code: EIA code; "
            "set one as OUTBOX__BALANCING_AUTHORITIES__<CODE>=<EIA code>"
        )
    current = data.get("balancing_authorities")
    if current is None:
        current = dict(DEFAULT_BAS)
    if not isinstance(current, dict):
        raise ConfigError(f"{source}: cannot set an entry: balancing_authorities is not a map")
    code = path[0]
    merged = {k: v for k, v in current.items() if str(k).lower() != code.lower()}
    if value is not None and value != "":
        merged[code] = value
    data["balancing_authorities"] = merged


def _read_secret_file(name: str, file: str) -> str:
    try:
        secret = Path(file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{name}: cannot read secret file {file}: {reason}") from None
    if not secret:
        raise ConfigError(f"{name}: secret file {file} is empty")
    return secret


def _describe(
    exc: ValidationError, file: Path | None, from_env: Mapping[tuple[str, ...], str]
) -> str:
    parts, in_file = [], False
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        message = message.removeprefix("Value error, ")
        # A whole-config rule names its own keys.
        text = f"{loc}: {message}" if loc else message
        source = _env_source(tuple(str(p) for p in error["loc"]), from_env)
        if source is not None:
            text = f"{source}: {text}"  # the value came from the environment
        else:
            in_file = True
        parts.append(text)
    where = (f"{file}: " if file else "config: ") if in_file else ""
    return where + "; ".join(parts)


def _env_source(loc: tuple[str, ...], from_env: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set the key at ``loc`` (or a section above it), if one did."""
    for n in range(len(loc), 0, -1):
        if (name := from_env.get(loc[:n])) is not None:
            return name
    return None
