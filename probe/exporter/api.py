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
    """Return the /api/results document from the store's latest results, each with its recent outcomes."""
    results = store.results()
    doc = results_document(config.vantage, results, store.ranking(config), store.group_ranking(config))
    for item, result in zip(_dicts(doc["results"]), results, strict=True):
        recent, since = store.streak(result.target, result.route)
        item["recent_outcomes"] = [str(o) for o in recent]
        item["outcome_since"] = None if since is None else round(since, 3)
    return doc


def _dicts(items: object) -> list[dict[str, object]]:
    assert isinstance(items, list)
    return items


def routes_json(store: ResultStore, config: Config) -> dict[str, object]:
    """Return the /api/routes document from the store's rankings."""
    return routes_document(config.vantage, store.ranking(config), store.group_ranking(config))
