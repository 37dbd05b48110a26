"""The ``iot-gateway`` command. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error."""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from gateway import __version__
from gateway.amqp_bench import bench_amqp_command
from gateway.audit import audit_group
from gateway.auth import passwd_command
from gateway.broker_bench import bench_broker_command
from gateway.coap_bench import bench_coap_command
from gateway.config import Config, load_config, split_host_port
from gateway.errors import ConfigError, GatewayError
from gateway.regions_bench import bench_regions_command
from gateway.simulate import simulate_command
from gateway.supervisor import WorkerCount, WorkerRole
from gateway.workers_bench import bench_workers_command


def _setup_logging(level: str, tag: str | None = None) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {f'[{tag}] ' if tag else ''}%(name)s: %(message)s",
        stream=sys.stderr,
    )


class _ConfigClickException(click.ClickException):
    exit_code = 2


def _load_or_exit(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        raise _ConfigClickException(f"invalid configuration: {err}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iot-gateway")
def main() -> None:
    """iot-gateway: MQTT ingest, classification, tiered priority dispatch, pipelines, sinks."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML config file (default: the built-in config).")
@click.option("--mqtt-listen", metavar="HOST:PORT",
              help="MQTT listener, overrides mqtt.listen (port 0: any free port).")
@click.option("--admin-listen", metavar="HOST:PORT",
              help="Admin HTTP listener, overrides admin.listen (port 0: any free port).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              help="Overrides gateway.log_level.")
@click.option("--shutdown-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to drain queued work on SIGTERM.")
@click.option("--coap-listen", metavar="HOST:PORT",
              help="CoAP UDP listener, overrides coap.listen (port 0: any free port).")
@click.option("--amqp-url", metavar="URL",
              help="Turn AMQP on (RabbitMQ, amqp://user:password@host:port/vhost): consume "
                   "the [amqp] queues (default iotgw.ingest), publish processed results to "
                   "iotgw.processed and alerts to iotgw.alerts; overrides amqp.url.")
@click.option("--fleet-url", metavar="URL",
              help="Join the region's fleet through RabbitMQ (amqp://...): give saturated work "
                   "to the region's work queue, take it when idle, and route MQTT messages "
                   "to subscribers on every replica; overrides fleet.url.")
@click.option("--workers", type=WorkerCount(), default="1", show_default=True,
              help="Gateway processes sharing the listeners (SO_REUSEPORT), under a supervisor "
                   "that restarts them; 0 or auto: one per CPU; 1: one process, no supervisor.")
@click.option("--worker", "worker_spec", hidden=True, help="Internal: serve as a worker.")
def serve(config_path: Path | None, mqtt_listen: str | None, admin_listen: str | None,
          log_level: str | None, shutdown_timeout: float, coap_listen: str | None,
          amqp_url: str | None, fleet_url: str | None, workers: int,
          worker_spec: str | None) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    import uvloop

    from gateway.app import Gateway
    from gateway.supervisor import serve_worker, supervise

    config = _load_or_exit(config_path)
    role = WorkerRole.decode(worker_spec) if worker_spec is not None else None
    _setup_logging(log_level or config.gateway.log_level, role.tag if role else None)
    try:
        if role is None and workers != 1:
            sys.exit(supervise(config, workers, click.get_current_context(),
                               mqtt_listen=mqtt_listen, admin_listen=admin_listen,
                               coap_listen=coap_listen, shutdown_timeout=shutdown_timeout))
        gateway = Gateway(config, config_path=config_path, mqtt_listen=mqtt_listen,
                          admin_listen=admin_listen, shutdown_timeout=shutdown_timeout,
                          amqp_url=amqp_url, coap_listen=coap_listen, worker=role,
                          fleet_url=fleet_url)
        uvloop.run(gateway.run() if role is None else serve_worker(gateway, role))
    except ConfigError as err:
        where = config_path or "built-in config"
        raise _ConfigClickException(f"invalid configuration: {where}: {err}") from None
    except GatewayError as err:
        raise click.ClickException(str(err)) from None


def _admin_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--admin", "admin_url", metavar="URL",
        help="The gateway's admin API, e.g. http://127.0.0.1:9883 (default: from the "
             "config).")(command)
    return click.option(
        "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
        help="The config the gateway runs with (for admin.listen).")(command)


def _admin(config_path: Path | None, admin_url: str | None, method: str, path: str,
           body: Any = None) -> Any:
    """Call the running gateway's admin API; its JSON answer, or a clear error."""
    if admin_url is None:
        host, port = split_host_port(_load_or_exit(config_path).admin.listen, "127.0.0.1")
        admin_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(admin_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {err.code} {err.reason}"
        raise click.ClickException(message) from None
    except (urllib.error.URLError, OSError) as err:
        raise click.ClickException(f"cannot reach the admin API at {admin_url}: {err}") from None


@main.command()
@_admin_options
def drain(config_path: Path | None, admin_url: str | None) -> None:
    """Ask a running gateway to drain and exit (as SIGTERM does), through its admin API."""
    answer = _admin(config_path, admin_url, "POST", "/v1/drain")
    click.echo(f"draining: {answer.get('queued', 0)} messages queued")


@main.group()
def maintenance() -> None:
    """Maintenance windows of a running gateway (through its admin API)."""


def _duration(text: str) -> float:
    """"90", "90s", "15m", "2h" → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected seconds, or a number with s, m or h"
                                 ) from None


@maintenance.command("schedule")
@click.argument("name")
@click.option("--task", required=True, help="wal-compaction, audit-rotation, registry-rebuild "
                                           "or a plugin's name.")
@click.option("--start", help="ISO 8601 start (UTC when no offset is given).")
@click.option("--cron", help="Cron expression (UTC) of a recurring window.")
@click.option("--duration", required=True, help="Window length: 90, 90s, 15m, 2h.")
@click.option("--min-slots", type=int, default=1, show_default=True)
@click.option("--max-slots", type=int, default=1, show_default=True)
@click.option("--max-defer", default="1h", show_default=True,
              help="Longest the window may be deferred before it is skipped.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A task option (VALUE is parsed as JSON when it can be).")
@_admin_options
def maintenance_schedule(name: str, task: str, start: str | None, cron: str | None,
                         duration: str, min_slots: int, max_slots: int, max_defer: str,
                         options: tuple[str, ...], config_path: Path | None,
                         admin_url: str | None) -> None:
    """Reserve capacity for a maintenance task, once (--start) or recurring (--cron)."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{option!r}: expected KEY=VALUE", param_hint="--option")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    body = {"name": name, "task": task, "start": start, "cron": cron,
            "duration_s": _duration(duration), "min_slots": min_slots, "max_slots": max_slots,
            "max_defer_s": _duration(max_defer), "options": parsed}
    answer = _admin(config_path, admin_url, "POST", "/v1/maintenance",
                    {k: v for k, v in body.items() if v is not None})
    click.echo(f"scheduled {answer['name']}: {answer['task']}, next window "
               f"{answer['scheduled_start'] or answer['cron']}, {answer['min_slots']}.."
               f"{answer['max_slots']} slots")


@maintenance.command("list")
@click.option("--json", "as_json", is_flag=True, help="The admin API's JSON as is.")
@_admin_options
def maintenance_list(as_json: bool, config_path: Path | None, admin_url: str | None) -> None:
    """The reservations, their phase and the slots they hold now."""
    answer = _admin(config_path, admin_url, "GET", "/v1/maintenance")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"reserved now: {answer['reserved_slots']} slots")
    for r in answer["reservations"]:
        when = (r["cron"] and f"cron {r['cron']!r}") or r["scheduled_start"] or r["start"]
        click.echo(f"{r['name']:<20} {r['task']:<18} {r['phase']:<9} {r['slots']} slots "
                   f"({r['min_slots']}..{r['max_slots']})  {when}  [{r['source']}]")


@maintenance.command("cancel")
@click.argument("name")
@_admin_options
def maintenance_cancel(name: str, config_path: Path | None, admin_url: str | None) -> None:
    """Cancel a reservation; a window under way ends now and frees its slots."""
    _admin(config_path, admin_url, "DELETE", f"/v1/maintenance/{urllib.parse.quote(name, safe='')}")
    click.echo(f"cancelled {name}")


@main.command("bench-scenario")
@click.option("--overload", type=float, default=2.0, show_default=True,
              help="Standard-tier offered load, times the measured processing capacity.")
@click.option("--anomaly-rate", type=float, default=20.0, show_default=True,
              help="Anomalous critical readings a second.")
@click.option("--connections", type=int, default=4, show_default=True,
              help="Connections of the standard-tier flood.")
@click.option("--phase", "phase_s", type=float, default=5.0, show_default=True,
              help="Seconds measured per phase.")
@click.option("--phases", type=int, default=8, show_default=True,
              help="Phases, alternately without and with a maintenance window.")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Also run the same load through one FIFO lane (no tiers, no triage).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_scenario(overload: float, anomaly_rate: float, connections: int, phase_s: float,
                   phases: int, peer: bool, as_json: bool) -> None:
    """Tiers, anomalies and maintenance at twice the processing capacity, measured."""
    from gateway.scenario_bench import ScenarioArgs, run_scenario

    if phases < 2:
        raise click.UsageError("--phases needs at least 2 (one without, one with maintenance)")
    try:
        run_scenario(ScenarioArgs(overload=overload, anomaly_rate=anomaly_rate,
                                  connections=connections, phase_s=phase_s, phases=phases,
                                  peer=peer), as_json)
    except GatewayError as err:
        raise click.ClickException(str(err)) from None


@main.command("bench-scaling")
@click.option("--days", type=click.IntRange(min=2), default=7, show_default=True,
              help="Simulated days (the profile needs one to learn from).")
@click.option("--seed", type=int, default=1, show_default=True, help="Load and noise seed.")
@click.option("--day-seconds", "day_s", type=click.FloatRange(min=600), default=3600.0,
              show_default=True, help="Length of a compressed day.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_scaling(days: int, seed: int, day_s: float, as_json: bool) -> None:
    """A compressed week of daily cycles and bursts: static, reactive and predictive scaling."""
    from gateway.scaling_sim import BenchArgs, print_bench, run_bench

    print_bench(run_bench(BenchArgs(days=days, seed=seed, day_s=day_s)), as_json)


@main.command("check-config")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def check_config(path: Path) -> None:
    """Validate a config file: exit 0 if it is valid, 2 with the errors if not."""
    from gateway.auth import build_security
    from gateway.maintenance import validate as validate_maintenance
    from gateway.pipeline import validate_pipelines

    config = _load_or_exit(path)
    try:
        validate_pipelines(config)
        validate_maintenance(config)
        build_security(config.auth, Path.cwd())
    except ConfigError as err:
        raise _ConfigClickException(f"{path}: {err}") from None
    click.echo(f"{path}: ok ({len(config.tiers)} tiers, {len(config.pipelines)} pipelines, "
               f"{len(config.sinks)} sinks)")


@main.command()
@click.option("--messages", type=int, default=400_000, show_default=True,
              help="Messages per QoS level.")
@click.option("--connections", type=int, default=8, show_default=True)
@click.option("--payload-size", type=int, default=64, show_default=True)
@click.option("--qos", "qos_levels", default="0,1", show_default=True,
              help="Comma-separated QoS levels to run.")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Also measure mosquitto (when on PATH) in the same run.")
@click.option("--paced-rate", type=int, default=50_000, show_default=True,
              help="Messages/s of the paced run that measures latency below saturation.")
@click.option("--pipeline", type=click.Choice(["null", "full"]), default="null",
              show_default=True,
              help="null: route straight to a null sink; full: decode, validate, enrich and "
                   "write the JSON-lines data lake.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(messages: int, connections: int, payload_size: int, qos_levels: str, peer: bool,
          paced_rate: int, pipeline: str, as_json: bool) -> None:
    """Measure ingest → classify → dispatch → null sink throughput and latency."""
    from gateway.bench import run_bench

    levels = [int(q) for q in qos_levels.split(",") if q.strip()]
    if any(q not in (0, 1, 2) for q in levels):
        raise click.UsageError("--qos takes levels 0, 1 and 2")
    try:
        run_bench(messages=messages, connections=connections, payload_size=payload_size,
                  qos_levels=levels, with_peer=peer, as_json=as_json, paced_rate=paced_rate,
                  pipeline=pipeline)
    except GatewayError as err:
        raise click.ClickException(str(err)) from None


main.add_command(audit_group)
main.add_command(passwd_command)
main.add_command(bench_broker_command)
main.add_command(bench_amqp_command)
main.add_command(bench_coap_command)
main.add_command(bench_workers_command)
main.add_command(bench_regions_command)
main.add_command(simulate_command)

if __name__ == "__main__":
    main()
