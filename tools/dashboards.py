"""Generate the Grafana dashboards in grafana/dashboards/ with the Grafana Foundation SDK.

The committed JSON is what ships (Grafana's file provisioning reads it); this module is how
it is made. After changing a panel, regenerate and commit both:

    python -m tools.dashboards            # rewrites grafana/dashboards/*.json
    python -m tools.dashboards --check    # exit 1 if the committed JSON differs (the suite does this)

Every query uses the variables `$vantage`, `$target`, `$route` (and `$resolver`, `$phase`
where they apply) as regexes, so "All" (`.*`) and multi-selections work. The end-to-end
test (tests/test_fleet_e2e.py) runs every expression here against a real central Prometheus.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import barchart, heatmap, stat, statetimeline, table, text, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import text as tm

from probe.models import Phase
from tools.panels import (
    BLUE,
    DNS,
    DS,
    GREEN,
    ORANGE,
    PAIR,
    RED,
    TARGET,
    TITLES,
    base,
    colored_table,
    datasource_variable,
    label_variable,
    legend_table,
    outcome_mappings,
    q,
    state_mappings,
    thresholds,
    transform,
    vantage_variables,
)

OUT = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
# Recorded by deploy/prometheus/rules/path.rules.yml: path loss and p90 under the vantage's local hour.
LOSS_BY_HOUR = "vantage_target_route_hour:probe_path_loss:ratio_5m"
P90_BY_HOUR = "vantage_target_route_hour:probe_path_rtt_p90_seconds:max"



def overview() -> db.Dashboard:
    """Vantage x target matrix coloured by outcome, blocked/failing counts, history, certificates."""
    board = base("probe-overview", TITLES["probe-overview"],
                 "Every target from every vantage: the last outcome, and what changed over time.")
    board = board.with_variable(datasource_variable())
    for v in vantage_variables():
        board = board.with_variable(v)
    counts = [
        ("Pairs probed", f"count(max by (vantage, target, route) (probe_success{{{PAIR}}}))", BLUE),
        ("OK", f"sum(max by (vantage, target, route) (probe_success{{{PAIR}}}))", GREEN),
        ("Blocked", f"sum(max by (vantage, target, route) (probe_blocked{{{PAIR}}}))", RED),
        ("Failing, not blocked",
         f"sum(max by (vantage, target, route) (1 - probe_success{{{PAIR}}} - probe_blocked{{{PAIR}}}))", ORANGE),
    ]
    for title, expr, colour in counts:
        board = board.with_panel(
            stat.Panel().title(title).datasource(DS).with_target(q(expr, instant=True))
            .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.FIXED).fixed_color(colour))
            .graph_mode(common.BigValueGraphMode.NONE).height(4).span(6)
        )
    board = board.with_panel(
        colored_table("Last outcome: target / route x vantage")
        .description(
            "Each cell is the outcome of the last probe of the target over the route from that vantage. "
            "Red: interference (blocked), orange: other failures, green: ok. The evidence behind a cell is in "
            "the probe's GET /api/results (results[].evidence) of that vantage, or `probe once --target NAME "
            "--route ROUTE --json` there."
        )
        .with_target(q(
            'label_join(max by (vantage, target, route, outcome) '
            f'(probe_outcome{{{PAIR}}} == 1), "pair", " / ", "target", "route")',
            instant=True, table_format=True,
        ))
        .with_transformation(transform("groupingToMatrix", columnField="vantage", rowField="pair",
                                       valueField="outcome", emptyValue="empty"))
        .with_transformation(transform("renameByName", renameByName={"pair\\vantage": "target / route"}))
        .mappings(outcome_mappings())
        .height(10).span(24)
    )
    board = board.with_panel(
        statetimeline.Panel().title("Outcome history (ok / failing / blocked)").datasource(DS)
        .with_target(q(
            f"max by (vantage, target, route) ((1 - probe_success{{{PAIR}}}) + probe_blocked{{{PAIR}}})",
            "{{vantage}} {{target}} {{route}}",
        ))
        .mappings(state_mappings())
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .thresholds(thresholds((None, GREEN), (1, ORANGE), (2, RED)))
        .merge_values(True).show_value(common.VisibilityMode.NEVER)
        .height(10).span(24)
    )
    board = board.with_panel(
        timeseries.Panel().title("Blocked probes by outcome").datasource(DS)
        .description("Probes per second ending in each outcome other than ok, over the selected pairs; a vantage "
                     "with none shows a line at 0 (probe_runs_total has a series only for outcomes that happened).")
        .with_target(q(
            f'sum by (vantage, outcome) (rate(probe_runs_total{{{PAIR},outcome!="ok"}}[$__rate_interval])) '
            f'or on (vantage) (0 * sum by (vantage) (rate(probe_runs_total{{{PAIR}}}[$__rate_interval])))',
            "{{vantage}} {{outcome}}",
        ))
        .unit("ops").stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(40)
        .height(8).span(12)
    )
    board = board.with_panel(
        table.Panel().title("Certificate expiry (earliest over the verified chain)").datasource(DS)
        .with_target(q(f"min by (target) (probe_ssl_earliest_cert_expiry{{{PAIR}}}) - time()",
                       instant=True, table_format=True))
        .with_transformation(transform("organize", excludeByName={"Time": True}, renameByName={"Value": "expires in"}))
        .unit("dtdurations")
        .thresholds(thresholds((None, RED), (7 * 86400, ORANGE), (14 * 86400, GREEN)))
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .cell_options(common.TableColoredBackgroundCellOptions())
        .height(8).span(12)
    )
    board = board.with_panel(pair_table(
        "Censor hop (last localisation)",
        "For targets with `locate: true`: the hop count from the vantage at which the last localisation saw "
        "the reset or forged answer (probe_censor_hop); 'not localised' where none found a hop. Compare "
        "vantages and routes: one hop for every target of a province is a provincial firewall, a hop just "
        "before the international link the national one. The routers of each hop, the injector's fingerprint "
        "(IP TTL and ID, TCP window and flags, payload, time after the trigger) and the evidence are in "
        "results[].locate of the vantage's GET /api/results. README: Localisation.",
        "probe_censor_hop", "hop", {"0": ("not localised", None)}, missing=0,
    ))
    board = board.with_panel(pair_table(
        "Name filter or address block (control handshake)",
        "For targets with `control_sni`: when the last handshake failed at the TLS stage, the monitor sent one "
        "with a name nobody filters to the same address and port (probe_sni_filtered). 'name filter (SNI)': "
        "that one answered, so the censor matches the name: another IP of the same name will not help, a "
        "route abroad will. 'address blocked': neither answered: the address is blocked for any name (or the "
        "server is down): a mirror on another address may work. 'not tested': the last run did not need the "
        "control (it passed, or failed before TLS), or residual blocking made it inconclusive. README: Control "
        "handshakes.",
        "probe_sni_filtered", "verdict",
        {"1": ("name filter (SNI)", RED), "0": ("address blocked", ORANGE), "-1": ("not tested", None)}, missing=-1,
    ))
    return board


def pair_table(title: str, description: str, metric: str, column: str,
               texts: dict[str, tuple[str, str | None]], missing: int) -> table.Panel:
    """Return a table of one per-pair gauge by vantage, target and route; `missing` where a pair has no series."""
    fallback = f" - {-missing}" if missing < 0 else f" + {missing}" if missing else ""
    return (
        table.Panel().title(title).datasource(DS).description(description)
        .with_target(q(
            f"max by (vantage, target, route) ({metric}{{{PAIR}}}) "
            f"or max by (vantage, target, route) (probe_success{{{PAIR}}}) * 0{fallback}",
            instant=True, table_format=True,
        ))
        .with_transformation(transform("organize", excludeByName={"Time": True}, renameByName={"Value": column},
                                       indexByName={"vantage": 0, "target": 1, "route": 2, "Value": 3}))
        .mappings([dm.ValueMap(options={
            value: dm.ValueMappingResult(text=text, index=i) if colour is None
            else dm.ValueMappingResult(text=text, color=colour, index=i)
            for i, (value, (text, colour)) in enumerate(texts.items())
        })])
        .height(8).span(24)
    )


def latency() -> db.Dashboard:
    """Duration per route over time, its distribution (heatmap and SmokePing-style band), phases, throughput."""
    board = base("probe-latency", TITLES["probe-latency"],
                 "How long probes take per vantage, target and route, and how the time is spread.")
    board = board.with_variable(datasource_variable())
    for v in vantage_variables():
        board = board.with_variable(v)
    board = board.with_variable(
        db.CustomVariable("phase").label("Phase").values(",".join(p.value for p in Phase))
        .current(dm.VariableOption(selected=True, text=Phase.CONNECT.value, value=Phase.CONNECT.value))
    )
    board = board.with_panel(
        timeseries.Panel().title("Probe duration per route").datasource(DS)
        .description("Duration of the last probe; failed probes included (a timeout shows as the timeout).")
        .with_target(q(f"max by (vantage, target, route) (probe_duration_seconds{{{PAIR}}})",
                       "{{vantage}} {{target}} {{route}}"))
        .unit("s").legend(legend_table()).height(9).span(24)
    )
    # SmokePing: the spread of the durations inside each step as a band, the median as a line.
    board = board.with_panel(
        timeseries.Panel().title("Spread of the duration (SmokePing-style: min-max band, median)").datasource(DS)
        .description("Per step: the fastest and slowest probe of the selected pairs as a band, the median as a "
                     "line. A wide band is jitter; a band that lifts off is a slower path.")
        .with_target(q(f"max(max_over_time(probe_duration_seconds{{{PAIR}}}[$__interval]))", "max", ref="A"))
        .with_target(q(f"min(min_over_time(probe_duration_seconds{{{PAIR}}}[$__interval]))", "min", ref="B"))
        .with_target(q(f"quantile(0.5, quantile_over_time(0.5, probe_duration_seconds{{{PAIR}}}[$__interval]))",
                       "median", ref="C"))
        .unit("s").line_width(1).fill_opacity(0)
        .override_by_name("max", [
            dm.DynamicConfigValue(id_val="custom.fillBelowTo", value="min"),
            dm.DynamicConfigValue(id_val="custom.fillOpacity", value=30),
            dm.DynamicConfigValue(id_val="custom.lineWidth", value=0),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "blue"}),
        ])
        .override_by_name("min", [
            dm.DynamicConfigValue(id_val="custom.lineWidth", value=0),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "blue"}),
        ])
        .override_by_name("median", [
            dm.DynamicConfigValue(id_val="custom.lineWidth", value=2),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "dark-blue"}),
        ])
        .height(9).span(12)
    )
    board = board.with_panel(
        heatmap.Panel().title("Distribution of the $phase phase (probe_phase_seconds)").datasource(DS)
        .description("How many probes of the selected pairs fell into each duration bucket per step. Only targets "
                     "with `histograms: true` in targets.yml have these series (off by default: README, \"What it "
                     "costs your Prometheus\").")
        .with_target(q(
            f'sum by (le) (increase(probe_phase_seconds_bucket{{{PAIR},phase=~"$phase"}}[$__rate_interval]))',
            "{{le}}", heatmap_format=True,
        ))
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Spectral").steps(64))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .height(9).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Phases of the last HTTP probe").datasource(DS)
        .description("connect grows with the path (or a proxy), tls and processing with the server.")
        .with_target(q(f"max by (vantage, target, route, phase) (probe_http_duration_seconds{{{PAIR}}})",
                       "{{vantage}} {{target}} {{route}} {{phase}}"))
        .unit("s").stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(30)
        .height(9).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("p50 / p90 of the $phase phase").datasource(DS)
        .description("From probe_phase_seconds: targets with `histograms: true` only. Without it, the SmokePing "
                     "band and the phases of the last probe show the same paths from the gauges.")
        .with_target(q(
            f'histogram_quantile(0.5, sum by (vantage, target, route, le) '
            f'(rate(probe_phase_seconds_bucket{{{PAIR},phase=~"$phase"}}[$__rate_interval])))',
            "p50 {{vantage}} {{target}} {{route}}", ref="A",
        ))
        .with_target(q(
            f'histogram_quantile(0.9, sum by (vantage, target, route, le) '
            f'(rate(probe_phase_seconds_bucket{{{PAIR},phase=~"$phase"}}[$__rate_interval])))',
            "p90 {{vantage}} {{target}} {{route}}", ref="B",
        ))
        .unit("s").height(9).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Download throughput per route").datasource(DS)
        .description("Targets with a `download` check only. Below min_bytes_per_second the outcome is throttled.")
        .with_target(q(f"max by (vantage, target, route) (probe_throughput_bytes_per_second{{{PAIR}}})",
                       "{{vantage}} {{target}} {{route}}"))
        .unit("Bps").min(0).legend(legend_table()).height(9).span(24)
    )
    return board


EVIDENCE = """\
**Where the evidence is.** Metrics carry only bounded labels (vantage, target, resolver, outcome);
the evidence itself (the forged answers, which canary replied, how many replies raced) is free
text and lives in the probe's JSON, on the vantage that saw it:

* `GET http://PROBE:9516/api/results`, then `results[].dns[]` where `resolver` is the one flagged:
  `answers`, `replies`, `consistent`, `evidence`.
* or, on that host: `probe once --target NAME --json | jq '.results[0].dns'`.

The *Evidence* link in the table opens `/api/results` of the probe named by the `instance` label,
when your browser can reach it (a probe scraped directly; not a vantage behind the border, whose
agent only pushes out).

**Reading the panels.** `dns_injection`: a canary answered, or two differing replies raced
(replies > 1). `dns_mismatch`: the answers share nothing with the control resolvers and fail a TLS
check for the name. A route whose resolver is DoH/DoT or a `socks5h` proxy avoids local poisoning.
"""


def dns() -> db.Dashboard:
    """DNS integrity per resolver: outcome, agreement with the controls, replies, lookup time, evidence."""
    board = base("probe-dns", TITLES["probe-dns"],
                 "Whether each resolver's answers for each target agree with the control resolvers.")
    board = board.with_variable(datasource_variable())
    for v in vantage_variables(route=False):
        board = board.with_variable(v)
    board = board.with_variable(label_variable(
        "resolver", 'probe_dns_outcome{vantage=~"$vantage",target=~"$target"}', "resolver", "Resolver"))
    board = board.with_panel(
        colored_table("Last DNS check per resolver")
        .with_target(q(
            f"max by (vantage, instance, target, resolver, outcome) (probe_dns_outcome{{{DNS}}} == 1)",
            instant=True, table_format=True,
        ))
        .with_transformation(transform("organize", excludeByName={"Time": True, "Value": True},
                                       indexByName={"vantage": 0, "target": 1, "resolver": 2, "outcome": 3,
                                                    "instance": 4}))
        .mappings(outcome_mappings())
        .override_by_name("instance", [dm.DynamicConfigValue(id_val="links", value=[{
            "title": "Evidence: /api/results on this probe",
            "url": "http://${__value.raw}/api/results",
            "targetBlank": True,
        }])])
        .height(9).span(14)
    )
    board = board.with_panel(
        text.Panel().title("DNS evidence").mode(tm.TextMode.MARKDOWN).content(EVIDENCE).height(9).span(10)
    )
    board = board.with_panel(
        statetimeline.Panel().title("Agrees with the control resolvers").datasource(DS)
        .with_target(q(f"min by (vantage, target, resolver) (probe_dns_consistent{{{DNS}}})",
                       "{{vantage}} {{target}} {{resolver}}"))
        .mappings([dm.ValueMap(options={
            "1": dm.ValueMappingResult(text="consistent", color=GREEN, index=0),
            "0": dm.ValueMappingResult(text="differs", color=RED, index=1),
        })])
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .thresholds(thresholds((None, RED), (1, GREEN)))
        .merge_values(True).show_value(common.VisibilityMode.NEVER)
        .height(8).span(24)
    )
    board = board.with_panel(
        timeseries.Panel().title("Replies per query (above 1: an injected reply raced the genuine one)")
        .datasource(DS)
        .with_target(q(f"max by (vantage, target, resolver) (probe_dns_replies{{{DNS}}})",
                       "{{vantage}} {{target}} {{resolver}}"))
        .min(0).decimals(0)
        .thresholds(thresholds((None, GREEN), (2, RED)))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE))
        .height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Lookup time per resolver").datasource(DS)
        .with_target(q(f"max by (vantage, target, resolver) (probe_dns_lookup_time_seconds{{{DNS}}})",
                       "{{vantage}} {{target}} {{resolver}}"))
        .unit("s").height(8).span(12)
    )
    return board


def routes() -> db.Dashboard:
    """Route comparison: the current recommendation, rank and score over time, availability, duration."""
    board = base("probe-routes", TITLES["probe-routes"],
                 "Which route to use per vantage and target (GET /api/routes), and how the routes compare.")
    board = board.with_variable(datasource_variable())
    for v in vantage_variables():
        board = board.with_variable(v)
    board = board.with_panel(
        table.Panel().title("Recommended route now (rank 1)").datasource(DS)
        .description("What storage clients following GET /api/routes use now, per vantage and target, "
                     "over all routes of the target (the route variable does not narrow it).")
        .with_target(q(
            f"max by (vantage, target, route) (probe_route_score{{{TARGET}}}) and on (vantage, target, route) "
            f"(max by (vantage, target, route) (probe_route_rank{{{TARGET}}}) == 1)",
            instant=True, table_format=True,
        ))
        .with_transformation(transform("organize", excludeByName={"Time": True},
                                       renameByName={"Value": "score", "route": "recommended route"}))
        .height(8).span(12)
    )
    board = board.with_panel(
        table.Panel().title("Recommended endpoint per group (targets with a `group`)").datasource(DS)
        .description("For endpoints serving the same content (mirrors, regions): the (target, route) ranked 1 "
                     "in each group that holds a selected target, as in GET /api/routes `groups`.")
        .with_target(q(
            'max by (vantage, group, target, route) (probe_group_rank{vantage=~"$vantage"}) == 1 '
            f"and on (vantage, group) max by (vantage, group) (probe_group_rank{{{TARGET}}})",
            instant=True, table_format=True,
        ))
        .with_transformation(transform("organize", excludeByName={"Time": True, "Value": True},
                                       renameByName={"target": "use target", "route": "over route"}))
        .height(8).span(12)
    )
    board = board.with_panel(
        table.Panel().title("Availability over the time range per route").datasource(DS)
        .with_target(q(f"avg by (vantage, target, route) (avg_over_time(probe_success{{{PAIR}}}[$__range]))",
                       instant=True, table_format=True))
        .with_transformation(transform("organize", excludeByName={"Time": True}, renameByName={"Value": "success"}))
        .unit("percentunit").min(0).max(1)
        .thresholds(thresholds((None, RED), (0.9, ORANGE), (0.99, GREEN)))
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .cell_options(common.TableColoredBackgroundCellOptions())
        .height(8).span(12)
    )
    board = board.with_panel(
        statetimeline.Panel().title("Recommended route over time").datasource(DS)
        .with_target(q(f"max by (vantage, target, route) (probe_route_rank{{{TARGET}}}) == 1",
                       "{{vantage}} {{target}}: {{route}}"))
        .merge_values(True).show_value(common.VisibilityMode.AUTO)
        .height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Route score (lower is better)").datasource(DS)
        .with_target(q(f"max by (vantage, target, route) (probe_route_score{{{PAIR}}})",
                       "{{vantage}} {{target}} {{route}}"))
        .legend(legend_table()).height(9).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Duration per route").datasource(DS)
        .with_target(q(f"max by (vantage, target, route) (probe_duration_seconds{{{PAIR}}})",
                       "{{vantage}} {{target}} {{route}}"))
        .unit("s").legend(legend_table()).height(9).span(12)
    )
    return board


def health() -> db.Dashboard:
    """The monitor's own health: scheduler lag, probe durations and rate, freshness, reloads, process."""
    board = base("probe-health", TITLES["probe-health"],
                 "Whether the probes themselves keep up: lag, durations, freshness, config reloads, resources.")
    board = board.with_variable(datasource_variable())
    board = board.with_variable(label_variable("vantage", "prober_config_last_reload_successful", "vantage",
                                               "Vantage"))
    v = 'vantage=~"$vantage"'
    board = board.with_panel(
        timeseries.Panel().title("Scheduler lag (start minus planned start)").datasource(DS)
        .with_target(q(
            f"histogram_quantile(0.5, sum by (vantage, instance, le) "
            f"(rate(prober_scheduler_lag_seconds_bucket{{{v}}}[$__rate_interval])))",
            "p50 {{vantage}} {{instance}}", ref="A",
        ))
        .with_target(q(
            f"histogram_quantile(0.99, sum by (vantage, instance, le) "
            f"(rate(prober_scheduler_lag_seconds_bucket{{{v}}}[$__rate_interval])))",
            "p99 {{vantage}} {{instance}}", ref="B",
        ))
        .unit("s").height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Probes per second by outcome").datasource(DS)
        .with_target(q(f"sum by (vantage, outcome) (rate(probe_runs_total{{{v}}}[$__rate_interval])) > 0",
                       "{{vantage}} {{outcome}}"))
        .unit("ops").stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(30)
        .height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Probe durations (slowest and median of the last runs)").datasource(DS)
        .with_target(q(f"max by (vantage) (probe_duration_seconds{{{v}}})", "max {{vantage}}", ref="A"))
        .with_target(q(f"quantile by (vantage) (0.5, probe_duration_seconds{{{v}}})", "median {{vantage}}",
                       ref="B"))
        .unit("s").height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Age of the newest result per vantage").datasource(DS)
        .description("ProbeVantageStale fires when it stays above 5 minutes.")
        .with_target(q(f"time() - max by (vantage) (probe_last_run_timestamp_seconds{{{v}}})", "{{vantage}}"))
        .unit("s").thresholds(thresholds((None, GREEN), (300, RED)))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE))
        .height(8).span(12)
    )
    board = board.with_panel(
        table.Panel().title("Config reloads").datasource(DS)
        .with_target(q(f"max by (vantage, instance) (prober_config_last_reload_successful{{{v}}})",
                       instant=True, table_format=True, ref="A"))
        .with_target(q(f"max by (vantage, instance) (time() - prober_config_last_reload_success_timestamp_seconds"
                       f"{{{v}}})", instant=True, table_format=True, ref="B"))
        .with_target(q(f"max by (vantage, instance) (changes(prober_config_last_reload_success_timestamp_seconds"
                       f"{{{v}}}[$__range]))", instant=True, table_format=True, ref="C"))
        .with_transformation(transform("merge"))
        .with_transformation(transform("organize", excludeByName={"Time": True}, renameByName={
            "Value #A": "last reload ok", "Value #B": "config age", "Value #C": "reloads in range"}))
        .override_by_name("last reload ok", [
            dm.DynamicConfigValue(id_val="mappings", value=[{"type": "value", "options": {
                "1": {"text": "yes", "color": GREEN, "index": 0}, "0": {"text": "rejected", "color": RED, "index": 1},
            }}]),
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
        ])
        .override_by_name("config age", [dm.DynamicConfigValue(id_val="unit", value="dtdurations")])
        .height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Probe process memory").datasource(DS)
        .description("Process metrics carry the vantage as an agent external label (deploy/prometheus/agent.yml).")
        .with_target(q(f"max by (vantage, instance) (process_resident_memory_bytes{{{v}}})",
                       "{{vantage}} {{instance}}"))
        .unit("bytes").height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Probe process CPU").datasource(DS)
        .with_target(q(f"max by (vantage, instance) (rate(process_cpu_seconds_total{{{v}}}[$__rate_interval]))",
                       "{{vantage}} {{instance}}"))
        .unit("percentunit").height(8).span(12)
    )
    return board


def path() -> db.Dashboard:
    """Path quality: loss, RTT and jitter per route over time, and by the vantage's hour of day over 7 days."""
    board = base("probe-path", TITLES["probe-path"],
                 "Loss and jitter from path sampling (targets with `path`), and the hours of the day they are worst "
                 "in, in each vantage's own time zone.")
    board = board.with_variable(datasource_variable())
    for v in vantage_variables():
        board = board.with_variable(v)
    pair = "vantage, target, route"
    board = board.with_panel(
        timeseries.Panel().title("Path loss per route").datasource(DS)
        .description("Share of path samples unanswered within their deadline (0.9 s): lost over sent.")
        .with_target(q(
            f"sum by ({pair}) (rate(probe_path_lost_total{{{PAIR}}}[$__rate_interval])) "
            f"/ sum by ({pair}) (rate(probe_path_sent_total{{{PAIR}}}[$__rate_interval]))",
            "{{vantage}} {{target}} {{route}}",
        ))
        .unit("percentunit").min(0).legend(legend_table()).height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Path RTT p90 per route").datasource(DS)
        .with_target(q(f'max by ({pair}) (probe_path_rtt_seconds{{{PAIR},stat="p90"}})',
                       "{{vantage}} {{target}} {{route}}"))
        .unit("s").legend(legend_table()).height(8).span(12)
    )
    board = board.with_panel(
        timeseries.Panel().title("Path jitter per route").datasource(DS)
        .description("Mean absolute difference of consecutive RTTs of the last sampling run.")
        .with_target(q(f"max by ({pair}) (probe_path_jitter_seconds{{{PAIR}}})", "{{vantage}} {{target}} {{route}}"))
        .unit("s").legend(legend_table()).height(8).span(12)
    )
    board = board.with_panel(
        table.Panel().title("Worst hour of day per route (7 days)").datasource(DS)
        .description("The vantage's local hour (its `timezone`) with the highest mean path loss over the last "
                     "7 days, from the hour-of-day recording rules (deploy/prometheus/rules/path.rules.yml).")
        .with_target(q(
            f"topk by ({pair}) (1, avg_over_time({LOSS_BY_HOUR}{{{PAIR}}}[7d]))",
            instant=True, table_format=True,
        ))
        .with_transformation(transform("organize", excludeByName={"Time": True},
                                       renameByName={"hour": "worst hour (local)", "Value": "mean loss"}))
        .unit("percentunit").height(8).span(12)
    )
    for title, record, unit in (
        ("Path loss by hour of day (7 days)", LOSS_BY_HOUR, "percentunit"),
        ("Path p90 RTT by hour of day (7 days)", P90_BY_HOUR, "s"),
    ):
        board = board.with_panel(
            barchart.Panel().title(title).datasource(DS)
            .description("Mean over the last 7 days per local hour of the vantage (00-23, its `timezone`); "
                         "one bar per vantage, target and route.")
            .with_target(q(
                f'label_join(avg_over_time({record}{{{PAIR}}}[7d]), "pair", " ", "vantage", "target", "route")',
                instant=True, table_format=True,
            ))
            .with_transformation(transform("groupingToMatrix", columnField="pair", rowField="hour",
                                           valueField="Value", emptyValue="null"))
            .with_transformation(transform("sortBy", sort=[{"field": "hour\\pair"}]))
            .x_field("hour\\pair")
            .unit(unit).height(9).span(12)
        )
    return board


DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "overview": overview, "latency": latency, "dns": dns, "routes": routes, "path": path, "health": health,
}


def render(builder: db.Dashboard) -> str:
    """Return the dashboard as the JSON Grafana provisions, stable key order."""
    return JSONEncoder(sort_keys=True, indent=2).encode(builder.build()) + "\n"


def rendered() -> dict[str, str]:
    """Return file name -> JSON for every dashboard."""
    return {f"{name}.json": render(build()) for name, build in DASHBOARDS.items()}


def expressions(doc: dict[str, object]) -> list[str]:
    """Return every PromQL expression of a dashboard JSON (panel targets, rows included)."""
    out: list[str] = []

    def walk(panels: object) -> None:
        for panel in panels if isinstance(panels, list) else []:
            for t in panel.get("targets", []):
                if t.get("expr"):
                    out.append(t["expr"])
            walk(panel.get("panels", []))

    walk(doc.get("panels", []))
    return out


GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h"}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Return `expr` with `$name` / `${name}` replaced from `values` and Grafana's interval variables."""
    out = expr
    for name, value in sorted({**GRAFANA_VARIABLES, **values}.items(), key=lambda kv: -len(kv[0])):
        out = out.replace("${" + name + "}", value).replace("$" + name, value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboards, or with --check report whether the committed ones are current."""
    parser = argparse.ArgumentParser(prog="python -m tools.dashboards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON, write nothing")
    parser.add_argument("--out", type=Path, default=OUT, help=f"directory (default {OUT})")
    args = parser.parse_args(argv)
    stale = []
    for name, body in rendered().items():
        path = args.out / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == body:
            continue
        stale.append(name)
        if not args.check:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run python -m tools.dashboards", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
