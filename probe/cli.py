"""The `probe` command: run, once, check, routes."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from probe import __version__, config
from probe.context import ProbeContext
from probe.exporter import api
from probe.exporter.limits import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PROBE_REUSE,
    DEFAULT_WRITE_TIMEOUT,
    ListenerLimits,
)
from probe.models import Outcome, ProbeResult
from probe.output import Progress, ranking_table, results_table
from probe.store import ResultStore

EXIT_OK, EXIT_NOT_OK, EXIT_USAGE = 0, 1, 2


def default_config_path() -> str:
    """Return `$PROBE_CONFIG`, else ./targets.yml."""
    return os.environ.get("PROBE_CONFIG") or "targets.yml"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="probe",
        description="Cross-border connectivity monitor: probes storage endpoints over every route, "
        "checks DNS integrity and exports Prometheus metrics.",
    )
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("PROBE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="log verbosity (default info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", default=None,
                       help="config file (default: $PROBE_CONFIG, then ./targets.yml)")
        return p

    run = with_config(sub.add_parser("run", help="scheduler + HTTP server until SIGTERM; SIGHUP reloads"))
    run.add_argument("--listen", help="host:port for the HTTP server (overrides the config's listen)")
    run.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                     default=os.environ.get("PROBE_WEB_CONFIG"),
                     help="TLS and basic auth for the endpoints (exporter-toolkit format); env PROBE_WEB_CONFIG")
    run.add_argument("--web.max-connections", dest="max_connections", type=_positive_int, metavar="N",
                     default=DEFAULT_MAX_CONNECTIONS,
                     help="open HTTP connections at most; more are answered 503 and closed (default %(default)s)")
    run.add_argument("--web.header-timeout", dest="header_timeout", type=_duration, metavar="D",
                     default=f"{DEFAULT_HEADER_TIMEOUT:g}s",
                     help="close a connection without a complete request head in this long, at its start or "
                     "idle after a response (default %(default)s)")
    run.add_argument("--web.write-timeout", dest="write_timeout", type=_duration, metavar="D",
                     default=f"{DEFAULT_WRITE_TIMEOUT:g}s",
                     help="drop a client that takes no part of a /metrics response in this long (default %(default)s)")
    run.add_argument("--web.probe-reuse", dest="probe_reuse", type=_duration, metavar="D",
                     default=f"{DEFAULT_PROBE_REUSE:g}s",
                     help="/probe answers with a target's results younger than this instead of probing again "
                     "(default %(default)s)")
    run.add_argument("--shard", type=_shard, metavar="I/N",
                     help="run only shard I of N of the targets (replicas of one vantage split the work)")

    demo = sub.add_parser("demo", help="a simulated border on loopback, and the monitor probing it (no root)")
    demo.add_argument("--listen", default="127.0.0.1:9516", help="host:port for the monitor (default %(default)s)")
    demo.add_argument("--interval", default="10s", help="probe interval (default %(default)s)")
    demo.add_argument("--timeout", default="3s", help="probe timeout (default %(default)s)")
    demo.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                      help="TLS and basic auth for the monitor's listener, as for `probe run`")

    once = with_config(sub.add_parser("once", help="one round of every (target, route), then exit"))
    once.add_argument("--target", action="append", metavar="NAME", help="only this target (repeatable)")
    once.add_argument("--route", action="append", metavar="NAME", help="only this route (repeatable)")
    once.add_argument("--json", action="store_true", help="print DESIGN.md JSON instead of a table")

    with_config(sub.add_parser("check", help="validate the config and exit"))

    routes = with_config(sub.add_parser(
        "routes", help="one round, then the route ranking per target and per endpoint group"))
    routes.add_argument("--target", action="append", metavar="NAME", help="only this target (repeatable)")
    routes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `probe` console script."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `probe once | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        from probe.demo.app import main as demo_main

        return demo_main(args)
    path = args.config or default_config_path()
    if args.command == "run":
        from probe.loop import run as run_loop
        from probe.service import serve

        try:
            limits = ListenerLimits(args.max_connections, args.header_timeout, args.write_timeout, args.probe_reuse)
            return run_loop(serve(path, args.listen, shard=args.shard, web_config_file=args.web_config_file,
                                  limits=limits))
        except config.ConfigError as e:  # the targets file, or the web config (which names itself)
            return _config_failed(getattr(e, "path", path), e)
        except KeyboardInterrupt:
            return EXIT_OK
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        return _config_failed(path, e)
    if args.command == "check":
        print(
            f"{path}: OK: {len(cfg.targets)} targets, {len(cfg.routes)} routes, "
            f"{len(cfg.resolvers)} resolvers, vantage {cfg.vantage!r}"
        )
        return EXIT_OK
    try:
        targets = _select(cfg, args.target, [t.name for t in cfg.targets], "target")
        route_names = _select(cfg, getattr(args, "route", None), [r.name for r in cfg.routes], "route")
    except ValueError as e:
        print(f"probe: {e}", file=sys.stderr)
        return EXIT_USAGE
    chosen = [cfg.target(n) for n in targets] if targets is not None else None
    results = asyncio.run(_round(cfg, chosen, route_names, show_progress=not args.json))
    if not results:
        print("probe: no (target, route) pair matches the selection", file=sys.stderr)
        return EXIT_USAGE
    store = ResultStore(cfg)
    for r in results:
        if r.path is not None:
            store.record_path(r.path)
        store.record(r)
        store.record_dns(r.target, r.dns)
    routes, groups = store.ranking(cfg), store.group_ranking(cfg)
    if chosen is not None:  # only the selected targets, and the groups they belong to
        names = {t.name for t in chosen}
        routes = {t: ranked for t, ranked in routes.items() if t in names}
        groups = {g: ranked for g, ranked in groups.items() if any(r.target in names for r in ranked)}
    if args.command == "once" and args.json:
        _print_json(api.results_document(cfg.vantage, results, routes, groups))
    elif args.command == "once":
        sys.stdout.write(results_table(results, color=_use_color(sys.stdout)))
    elif args.json:
        _print_json(api.routes_document(cfg.vantage, routes, groups))
    else:
        sys.stdout.write(ranking_table(routes, groups, color=_use_color(sys.stdout)))
    return EXIT_OK if all(r.outcome is Outcome.OK for r in results) else EXIT_NOT_OK


def _shard(text: str) -> tuple[int, int]:
    try:
        return config.parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _duration(text: str) -> float:
    try:
        seconds = config.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return seconds


def _select(cfg: config.Config, wanted: list[str] | None, known: list[str], what: str) -> list[str] | None:
    if not wanted:
        return None
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))} (configured: {', '.join(known)})")
    return list(dict.fromkeys(wanted))


async def _round(
    cfg: config.Config, targets: list[config.Target] | None, routes: list[str] | None, *, show_progress: bool
) -> list[ProbeResult]:
    from probe.locate import Locator
    from probe.runner import run_round

    ctx = ProbeContext(cfg)
    chosen = targets if targets is not None else list(cfg.targets)
    total = sum(1 for t in chosen for r in t.routes if routes is None or r in routes)
    progress = Progress(total, sys.stderr) if show_progress and sys.stderr.isatty() else None
    try:
        # `once` does not wait minutes for a residual block to lift: it says `deferred` instead.
        locator = Locator(wait_residual=False)
        return await run_round(cfg, ctx, chosen, routes, on_result=progress.update if progress else None,
                               sample_paths=True, locator=locator)
    finally:
        if progress:
            progress.done()
        await ctx.close()


def _config_failed(path: str, error: config.ConfigError) -> int:
    print(f"{path}: invalid config ({len(error.problems)} problem{'s' * (len(error.problems) != 1)}):",
          file=sys.stderr)
    for line in error.problems:
        print(f"  {line}", file=sys.stderr)
    return EXIT_USAGE


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _use_color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


if __name__ == "__main__":
    sys.exit(main())
