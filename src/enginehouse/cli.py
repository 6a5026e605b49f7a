"""The ``enginehouse`` command: ``serve`` a model repository over HTTP and gRPC, ``build``
its engines ahead of time, and list or prune the engine ``cache``.

Flag names and defaults follow tritonserver wherever both have the flag, so that
deployment scripts carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from enginehouse import engine_commands
from enginehouse.builder.cache import RESOLUTION, EngineCache, default_root
from enginehouse.core.server import ControlMode, ServerCore
from enginehouse.frontends.grpc.ring import DEFAULT_RING_BYTES
from enginehouse.frontends.http.connections import HttpLimits
from enginehouse.frontends.security import API_GROUPS, RestrictedApis, TlsSettings
from enginehouse.observe.metrics import MetricsOptions
from enginehouse.repository import ModelRepository
from enginehouse.scheduler.base import PendingLimits
from enginehouse.version import __version__

if TYPE_CHECKING:
    from enginehouse.serving import Server

log = logging.getLogger("enginehouse")


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enginehouse",
        description="An inference server for ONNX and PyTorch models over the KServe v2 / "
        "Triton protocol.",
        epilog="Run 'enginehouse COMMAND --help' for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"enginehouse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over HTTP and gRPC",
        description="Serve the models of Triton model repositories over HTTP/REST, gRPC and "
        f"Prometheus metrics until SIGINT or SIGTERM. {RESOLUTION}. Exit status: 0 after a "
        "clean shutdown, 1 when a port cannot be bound, 2 for bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    engine_commands.add_model_repository(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    serve.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    serve.add_argument("--allow-http", type=_bool, default=True, help="serve HTTP/REST")
    serve.add_argument("--allow-grpc", type=_bool, default=True, help="serve gRPC")
    serve.add_argument(
        "--grpc-workers",
        type=int,
        default=0,
        help="serve gRPC from this many worker processes sharing the port (0: in process)",
    )
    serve.add_argument(
        "--grpc-frontend",
        choices=("auto", "native", "grpcio"),
        default="auto",
        help="what serves gRPC: enginehouse's own HTTP/2 layer (native: a third of grpcio's CPU "
        "per call) or grpcio's asyncio server; auto: native in process, grpcio in the "
        "--grpc-workers (native workers had a higher p99 for large tensors at the core's limit)",
    )
    serve.add_argument(
        "--grpc-relay-ring-mb",
        type=int,
        default=DEFAULT_RING_BYTES >> 20,
        help="with --grpc-workers: each worker's two shared-memory rings, this many MB each, "
        "through which requests and answers of 64 KB and more travel between it and the core "
        "(0: every message over the relay socket)",
    )
    serve.add_argument("--allow-metrics", type=_bool, default=True, help="serve Prometheus metrics")
    serve.add_argument(
        "--model-control-mode",
        choices=[m.value for m in ControlMode],
        default=ControlMode.NONE.value,
        help="none: load everything, refuse load/unload; explicit: load --load-model and "
        "serve the repository API; poll: load everything and follow repository changes",
    )
    serve.add_argument(
        "--repository-poll-secs",
        type=float,
        default=15.0,
        help="in poll mode, seconds between scans of the repository for changed models",
    )
    serve.add_argument(
        "--load-model",
        action="append",
        default=[],
        help="model to load at start in explicit mode (repeatable, '*' for all)",
    )
    serve.add_argument(
        "--strict-model-config",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="require config.pbtxt; do not complete configs from model files",
    )
    serve.add_argument(
        "--strict-readiness",
        type=_bool,
        default=True,
        help="ready only when every model meant to load is ready",
    )
    serve.add_argument(
        "--metrics-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="summary_latencies=true adds Triton's latency summaries (repeatable)",
    )
    serve.add_argument(
        "--instance-health-check-secs",
        type=float,
        default=0.0,
        help="run a warm-up inference on idle instances this often; replace those that fail "
        "(0: off)",
    )
    serve.add_argument(
        "--engine-cache",
        type=Path,
        default=None,
        help="engine cache folder",
    )
    serve.add_argument(
        "--model-warmup",
        type=_bool,
        default=True,
        help="run warm-up inferences on every instance before it is ready",
    )
    serve.add_argument(
        "--map-shared-memory",
        type=_bool,
        default=None,
        help="map system shared-memory regions, as Triton does: inputs are read in place and "
        "outputs copied into the mapping (about half the CPU per 1 MB tensor), with a guard "
        "that turns a region truncated under its mapping into a 400 for the request that met "
        "it (default: on where the guard is built, which needs a C compiler at install); "
        "false reads and writes regions through their descriptor",
    )
    serve.add_argument(
        "--pin-shared-memory",
        type=_bool,
        default=None,
        help="page-lock system shared-memory regions with the CUDA driver when they are "
        "registered, so that GPU models copy their inputs from the client's pages to the "
        "device by DMA, with no CPU copy (default: on where the machine has an NVIDIA GPU; "
        "at most 16 GiB of regions are pinned, the rest are read as before)",
    )
    serve.add_argument(
        "--http-max-input-size",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request body accepted, in bytes (413 above)",
    )
    serve.add_argument(
        "--http-max-header-size",
        type=int,
        default=HttpLimits().header_bytes,
        help="largest request line and headers accepted, in bytes (431 above)",
    )
    serve.add_argument(
        "--http-header-timeout-secs",
        type=float,
        default=HttpLimits().header_timeout_s,
        help="a request's headers must arrive within this, from its first byte (408 and "
        "close; 0: no limit)",
    )
    serve.add_argument(
        "--http-body-timeout-secs",
        type=float,
        default=HttpLimits().body_timeout_s,
        help="the longest pause in a request body (408 and close; 0: no limit)",
    )
    serve.add_argument(
        "--http-keepalive-timeout-secs",
        type=float,
        default=HttpLimits().keepalive_timeout_s,
        help="close a kept-alive connection idle this long (0: never)",
    )
    serve.add_argument(
        "--http-max-connections",
        type=int,
        default=HttpLimits().max_connections,
        help="open HTTP connections; new ones past it get 503 and are closed (at most what "
        "the open-file limit allows)",
    )
    serve.add_argument(
        "--model-max-pending-requests",
        type=int,
        default=PendingLimits().max_requests,
        help="requests a model version holds queued or running; more get 503 / UNAVAILABLE at "
        "once (0: no bound)",
    )
    serve.add_argument(
        "--model-max-pending-bytes",
        type=int,
        default=PendingLimits().max_bytes,
        help="input bytes a model version holds queued or running; more get 503 / UNAVAILABLE "
        "at once (0: no bound)",
    )
    serve.add_argument(
        "--exit-timeout-secs",
        type=float,
        default=30.0,
        help="how long shutdown waits for in-flight requests",
    )
    for protocol, flag in (
        ("http", "--http-restricted-api"),
        ("grpc", "--grpc-restricted-protocol"),
    ):
        serve.add_argument(
            flag,
            action="append",
            default=[],
            metavar="APIS:HEADER=VALUE",
            help=f"{protocol.upper()} requests to these comma-separated API groups "
            f"({', '.join(API_GROUPS)}) need this header, else 403 / PERMISSION_DENIED "
            "(repeatable)",
        )
        serve.add_argument(
            f"--{protocol}-use-ssl",
            type=_bool,
            nargs="?",
            const=True,
            default=False,
            help=f"serve {protocol.upper()} over TLS",
        )
        serve.add_argument(
            f"--{protocol}-use-ssl-mutual",
            type=_bool,
            nargs="?",
            const=True,
            default=False,
            help=f"serve {protocol.upper()} over mutual TLS: clients present a certificate "
            "signed by the root certificate",
        )
        serve.add_argument(f"--{protocol}-server-cert", type=Path, help="server certificate (PEM)")
        serve.add_argument(f"--{protocol}-server-key", type=Path, help="server private key (PEM)")
        serve.add_argument(
            f"--{protocol}-root-cert", type=Path, help="root certificate for client certificates"
        )
    serve.add_argument("--log-verbose", type=int, default=0, help="verbosity: 0 info, >0 debug")
    engine_commands.add_commands(commands)
    return parser


def metrics_options(settings: list[str]) -> MetricsOptions:
    """``--metrics-config`` KEY=VALUE settings, as tritonserver spells them."""
    summary, window = False, 1024
    for setting in settings:
        key, _, value = setting.partition("=")
        if key == "summary_latencies":
            summary = _bool(value)
        elif key == "summary_window":
            window = int(value)
        else:
            raise SystemExit(f"--metrics-config: unknown setting '{key}'")
    return MetricsOptions(summary_latencies=summary, summary_window=window)


def access_settings(
    args: argparse.Namespace, protocol: str
) -> tuple[RestrictedApis, TlsSettings | None]:
    """A protocol's restricted APIs and TLS from its flags; SystemExit names a bad one."""
    specs = args.http_restricted_api if protocol == "http" else args.grpc_restricted_protocol
    try:
        restricted = RestrictedApis.parse(specs)
        tls = TlsSettings.from_flags(
            getattr(args, f"{protocol}_use_ssl"),
            getattr(args, f"{protocol}_server_cert"),
            getattr(args, f"{protocol}_server_key"),
            getattr(args, f"{protocol}_root_cert"),
            getattr(args, f"{protocol}_use_ssl_mutual"),
        )
    except ValueError as exc:
        raise SystemExit(f"enginehouse serve: {protocol}: {exc}") from None
    return restricted, tls


def assemble(args: argparse.Namespace) -> Server:
    """The server ``serve``'s flags describe: the core and the frontends they allow."""
    from enginehouse.frontends.grpc.native_calls import ServiceCalls
    from enginehouse.frontends.grpc.native_server import NativeGrpcServer
    from enginehouse.frontends.grpc.relay import GrpcWorkers
    from enginehouse.frontends.grpc.service import GrpcServer, InferenceService
    from enginehouse.frontends.http.app import HttpServer
    from enginehouse.frontends.metrics import MetricsServer
    from enginehouse.serving import Frontend, Server

    options = metrics_options(args.metrics_config)
    http_access = access_settings(args, "http")
    grpc_access = access_settings(args, "grpc")
    core = ServerCore(
        ModelRepository(args.model_repository),
        control_mode=ControlMode(args.model_control_mode),
        startup_models=args.load_model,
        strict_model_config=args.strict_model_config,
        strict_readiness=args.strict_readiness,
        warmup=args.model_warmup,
        latency_window=options.summary_window if options.summary_latencies else 0,
        health_check_s=args.instance_health_check_secs,
        engine_cache=EngineCache(args.engine_cache or default_root(args.model_repository)),
        poll_s=args.repository_poll_secs,
        pending_limits=PendingLimits(
            args.model_max_pending_requests or 2**62, args.model_max_pending_bytes or 2**62
        ),
        map_shared_memory=args.map_shared_memory,
        pin_shared_memory=args.pin_shared_memory,
    )
    frontends: list[Frontend] = []
    if args.allow_http:
        limits = HttpLimits(
            body_bytes=args.http_max_input_size,
            header_bytes=args.http_max_header_size,
            header_timeout_s=args.http_header_timeout_secs,
            body_timeout_s=args.http_body_timeout_secs,
            keepalive_timeout_s=args.http_keepalive_timeout_secs,
            max_connections=args.http_max_connections,
        )
        http = HttpServer(core, args.host, args.http_port, limits, *http_access)
        core.add_request_warmer(http.app.warm)
        frontends.append(http)
    if args.allow_grpc:
        grpc_server: GrpcServer | GrpcWorkers | NativeGrpcServer
        if args.grpc_workers > 0:
            workers = GrpcWorkers(
                core,
                args.host,
                args.grpc_port,
                args.http_max_input_size,
                args.grpc_workers,
                *grpc_access,
                frontend="native" if args.grpc_frontend == "native" else "grpcio",
                ring_size=max(0, args.grpc_relay_ring_mb) << 20,
            )
            core.add_request_warmer(workers.service.warm)
            core.add_ready_gate(workers.warm_workers)
            grpc_server = workers
        elif args.grpc_frontend in ("auto", "native"):
            service = InferenceService(core)
            core.add_request_warmer(service.warm)
            grpc_server = NativeGrpcServer(
                ServiceCalls(service),
                args.host,
                args.grpc_port,
                args.http_max_input_size,
                *grpc_access,
            )
        else:
            grpc_server = GrpcServer(
                core, args.host, args.grpc_port, args.http_max_input_size, *grpc_access
            )
            core.add_request_warmer(grpc_server.service.warm)
        frontends.append(grpc_server)
    if args.allow_metrics:
        frontends.append(MetricsServer(core, args.host, args.metrics_port, options))
    return Server(core, frontends, args.exit_timeout_secs)


def quiet_numpy() -> None:
    """A client's JSON number past a float type's range becomes inf; NumPy's warning for it,
    printed once per such request, is nothing an operator could act on."""
    import numpy as np

    np.seterr(over="ignore", invalid="ignore")


async def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT or SIGTERM, then drain and stop."""
    quiet_numpy()
    server = assemble(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.listen()
    load = asyncio.create_task(server.load())
    await asyncio.wait(
        [load, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    await stop.wait()
    if not load.done():
        load.cancel()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # Like any Unix tool: `enginehouse cache ls | head` ends quietly when head does.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    quiet = args.command != "serve"  # build and cache print tables; logs only when verbose
    logging.basicConfig(
        level=logging.DEBUG
        if getattr(args, "log_verbose", 0) > 0
        else (logging.WARNING if quiet else logging.INFO),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "build":
        return engine_commands.run_build(args)
    if args.command == "cache":
        return engine_commands.run_cache(args)
    if args.command == "serve":
        if args.repository_poll_secs <= 0:
            log.error("--repository-poll-secs must be > 0")
            return 2
        try:
            import uvloop

            return int(uvloop.run(serve(args)))
        except OSError as exc:
            log.error("%s", exc)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
