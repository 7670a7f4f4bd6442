"""The JSON documents of DESIGN.md: results (`/api/results`, `probe once --json`) and routes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from probe import ranking
from probe.config import Config
from probe.models import ProbeResult
from probe.ranking import Ranked
from probe.store import ResultStore


def results_document(
    vantage: str,
    results: Sequence[ProbeResult],
    routes: Mapping[str, Sequence[Ranked]],
    groups: Mapping[str, Sequence[Ranked]],
) -> dict[str, object]:
    """Return the results document: vantage, results, route order per target and per group."""
    return {
        "vantage": vantage,
        "results": [r.to_json() for r in results],
        "routes": ranking.order(routes),
        "groups": ranking.group_order(groups),
    }


def routes_document(
    vantage: str, routes: Mapping[str, Sequence[Ranked]], groups: Mapping[str, Sequence[Ranked]]
) -> dict[str, object]:
    """Return the routes document: vantage, then per target and per group, best first with scores."""
    return {"vantage": vantage, **ranking.to_json(routes, groups)}


def results_json(store: ResultStore, config: Config) -> dict[str, object]:
    """Return the /api/results document from the store's latest results."""
    return results_document(config.vantage, store.results(), store.ranking(config), store.group_ranking(config))


def routes_json(store: ResultStore, config: Config) -> dict[str, object]:
    """Return the /api/routes document from the store's rankings."""
    return routes_document(config.vantage, store.ranking(config), store.group_ranking(config))
