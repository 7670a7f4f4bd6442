"""Building blocks for the Grafana dashboards of tools/dashboards.py (Grafana Foundation SDK).

Queries go to the dashboard's `datasource` variable; label variables are multi-value with
"All" = `.*`, so every selector is a regex match.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, table
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from probe.models import Outcome

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
PAIR = 'vantage=~"$vantage",target=~"$target",route=~"$route"'
TARGET = 'vantage=~"$vantage",target=~"$target"'  # the recommendation is over all routes of a target
DNS = 'vantage=~"$vantage",target=~"$target",resolver=~"$resolver"'
TAGS = ["probe"]

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"


def q(expr: str, legend: str = "", *, instant: bool = False, table_format: bool = False,
      heatmap_format: bool = False, ref: str = "A") -> prometheus.Dataquery:
    """Return a Prometheus query of the datasource variable."""
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        query = query.legend_format(legend)
    if instant:
        query = query.instant()
    else:
        query = query.range()
    if table_format:
        query = query.format(pm.PromQueryFormat.TABLE)
    if heatmap_format:
        query = query.format(pm.PromQueryFormat.HEATMAP)
    return query


def label_variable(name: str, metric: str, label: str, label_text: str) -> db.QueryVariable:
    """Return a multi-value variable over the values of `label` on `metric`, "All" = `.*`."""
    return (
        db.QueryVariable(name)
        .label(label_text)
        .datasource(DS)
        .query(f"label_values({metric}, {label})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )


def datasource_variable() -> db.DatasourceVariable:
    """Return the Prometheus datasource picker (the provisioned one by default)."""
    return (
        db.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(dm.VariableOption(selected=True, text="Prometheus", value="prometheus"))
    )


def vantage_variables(*, route: bool = True) -> list[db.QueryVariable]:
    """Return the vantage, target (and route) variables, each narrowed by the ones before."""
    out = [
        label_variable("vantage", "probe_success", "vantage", "Vantage"),
        label_variable("target", 'probe_success{vantage=~"$vantage"}', "target", "Target"),
    ]
    if route:
        out.append(label_variable("route", 'probe_success{vantage=~"$vantage",target=~"$target"}', "route", "Route"))
    return out


def outcome_mappings() -> list[dm.ValueMapping]:
    """Colour every outcome: green ok, red the interference classes, orange other failures."""
    options = {
        o.value: dm.ValueMappingResult(color=GREEN if o is Outcome.OK else RED if o.blocked else ORANGE, index=i)
        for i, o in enumerate(Outcome)
    }
    return [dm.ValueMap(options=options)]


def state_mappings() -> list[dm.ValueMapping]:
    """Colour the state code 0 ok / 1 failing / 2 blocked used by the history panels."""
    return [dm.ValueMap(options={
        "0": dm.ValueMappingResult(text="ok", color=GREEN, index=0),
        "1": dm.ValueMappingResult(text="failing", color=ORANGE, index=1),
        "2": dm.ValueMappingResult(text="blocked", color=RED, index=2),
    })]


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    """Return absolute thresholds from (value, colour) pairs, the first value None."""
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps]
    )


def transform(id_val: str, **options: object) -> dm.DataTransformerConfig:
    """Return one transformation."""
    return dm.DataTransformerConfig(id_val=id_val, options=options)


def colored_table(title: str) -> table.Panel:
    """Return a table whose cells are coloured by their value mappings."""
    return table.Panel().title(title).datasource(DS).cell_options(
        common.TableColoredBackgroundCellOptions()
    )


def legend_table() -> cb.VizLegendOptions:
    """Return a legend as a table on the right, sorted."""
    return cb.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE).placement(
        common.LegendPlacement.BOTTOM
    ).show_legend(True).calcs(["mean", "max", "lastNotNull"])


def link(title: str, uid: str) -> db.DashboardLink:
    """Return a link to another probe dashboard that keeps the variables and time range."""
    return (
        db.DashboardLink(title)
        .type(dm.DashboardLinkType.LINK)
        .url(f"/d/{uid}")
        .include_vars(True)
        .keep_time(True)
        .icon("dashboard")
    )


TITLES = {
    "probe-overview": "Probe / Overview",
    "probe-latency": "Probe / Latency",
    "probe-dns": "Probe / DNS integrity",
    "probe-routes": "Probe / Routes",
    "probe-path": "Probe / Path quality",
    "probe-health": "Probe / Monitor health",
}


def base(uid: str, title: str, description: str) -> db.Dashboard:
    """Return a dashboard with the shared settings and links to the other probe dashboards."""
    board = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
    )
    for other_uid, other_title in TITLES.items():
        if other_uid != uid:
            board = board.link(link(other_title, other_uid))
    return board
