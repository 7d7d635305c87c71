"""Rule defaults and their per-dataset and per-BA overrides (docs/quality.md says why)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from outbox.config import QUALITY_RULES, QualityConfig, RuleSettings

STORAGE_FUELS = (
    "battery",
    "pumped_storage",
    "solar_battery",
    "wind_battery",
    "unknown_storage",
    "other_storage",
    "hydro",
)


@dataclass(frozen=True)
class Settings:
    """The effective settings of one rule for one dataset and BA."""

    enabled: bool = True
    action: str = "warn"
    severity: str = "warn"
    tolerance: float = 0.0
    min_mw: float = 0.0
    threshold: float = 0.0
    window_hours: int = 24


DEFAULTS: dict[str, Settings] = {
    "balance": Settings(tolerance=0.10, min_mw=100.0),
    "interchange_sum": Settings(tolerance=0.05, min_mw=50.0),
    "antisymmetry": Settings(tolerance=0.05, min_mw=10.0),
    "fuel_sum": Settings(tolerance=0.05, min_mw=100.0),
    "repeated_day": Settings(severity="crit", window_hours=24),
    "flat_line": Settings(window_hours=6),
    "spike": Settings(threshold=8.0, tolerance=0.01, min_mw=50.0, window_hours=24),
    "negative_generation": Settings(threshold=100.0),
    "dropped_series": Settings(threshold=6.0),
    "large_revision": Settings(severity="info", threshold=0.25, min_mw=100.0),
}
# Defaults that differ by dataset, before the config's overrides.
DATASET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "flat_line": {
        "demand_forecast": {"enabled": False},
        "interchange": {"window_hours": 24},
        "generation": {"window_hours": 24},
        "ba_interchange": {"enabled": False},
    },
    "spike": {
        "demand_forecast": {"enabled": False},
        "interchange": {"enabled": False},
        "generation": {"enabled": False},
        "ba_interchange": {"enabled": False},
    },
    "repeated_day": {"demand_forecast": {"enabled": False}},
}
# The dataset whose overrides a BA-level rule reads.
SUBJECT_DATASET = {
    "balance": "net_generation",
    "interchange_sum": "interchange",
    "antisymmetry": "ba_interchange",
    "fuel_sum": "generation",
}


def _merge(base: Settings, over: RuleSettings | dict[str, Any] | None) -> Settings:
    if over is None:
        return base
    given = over if isinstance(over, dict) else over.model_dump(exclude_none=True)
    given = {k: v for k, v in given.items() if k in Settings.__dataclass_fields__}
    return replace(base, **given) if given else base


class Resolver:
    """Settings lookups for one configuration, cached (the rules ask per BA and dataset)."""

    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        self._cache: dict[tuple[str, str | None, str | None], Settings] = {}

    def get(self, rule: str, dataset: str | None = None, ba: str | None = None) -> Settings:
        """Defaults, ``quality.rules.<rule>``, its ``datasets.<dataset>``, its ``bas.<ba>``."""
        key = (rule, dataset, ba)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._resolve(rule, dataset, ba)
        return found

    def _resolve(self, rule: str, dataset: str | None, ba: str | None) -> Settings:
        # The rule's defaults, the rule's settings, the dataset's defaults, the dataset's
        # settings, the BA's settings: a rule-wide setting does not undo a dataset default
        # (``flat_line: {window_hours: 8}`` leaves generation at 24 h).
        dataset = dataset or SUBJECT_DATASET.get(rule)
        cfg = self.config.rules.get(rule)
        out = _merge(DEFAULTS[rule], cfg)
        if dataset is not None:
            out = _merge(out, DATASET_DEFAULTS.get(rule, {}).get(dataset))
        if cfg is None:
            return out
        if dataset is not None:
            out = _merge(out, cfg.datasets.get(dataset))
        if ba is not None:
            out = _merge(out, cfg.bas.get(ba))
        return out

    def exempt_fuels(self) -> frozenset[str]:
        """Fuels negative_generation leaves alone (storage, pumped hydro)."""
        cfg = self.config.rules.get("negative_generation")
        fuels = cfg.exempt_fuels if cfg is not None and cfg.exempt_fuels is not None else None
        return frozenset(STORAGE_FUELS if fuels is None else fuels)

    def any_quarantine(self) -> bool:
        """Whether some rule, dataset or BA is configured to quarantine."""
        for rule in QUALITY_RULES:
            cfg = self.config.rules.get(rule)
            if cfg is None:
                continue
            overs = [cfg, *cfg.datasets.values(), *cfg.bas.values()]
            if any(o.action == "quarantine" for o in overs):
                return True
        return False
