"""``mukv serve``: parse the flags, build a :class:`~mukv.serve.ServeConfig`, start uvicorn."""

from __future__ import annotations

import argparse

SERVE_DESCRIPTION = """\
Serve a store over HTTP: one model, every stream of the store, an HTTP API (OpenAPI at /docs)
and a web page at /. Frames pushed to a stream (or pulled from a file, folder or camera/URL
given when the stream is created through the API) are ingested in the background, the frames of
many streams in one batch (one vision-tower batch and one prefill per level for all of them);
questions are answered between ingest steps. A stream that cannot keep up drops frames older than --max-lag
and records them as gaps. SIGINT/SIGTERM stop every stream cleanly; the next start resumes them.

Binds 127.0.0.1 unless told otherwise; any other address needs a bearer token (--token or
$MUKV_SERVE_TOKEN). Several servers can share one s3:// store: each stream is written by one
server at a time (a lease taken with the object store's conditional writes), any server answers
questions about any stream, and a server that dies leaves its streams to the others."""


def add_parser(sub) -> None:
    from .common import RANDOM_MODEL, TRAINED_MODEL

    p = sub.add_parser("serve", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="serve a store over HTTP: API, live ingest, web page", description=SERVE_DESCRIPTION)
    p.add_argument("store", help="the store: a folder (created if missing) or an s3://bucket/prefix URI")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free port)")
    p.add_argument("--model", help=f"a model preset or checkpoint directory (default: the store's, else "
                                   f"{TRAINED_MODEL}; {RANDOM_MODEL} has random weights)")
    p.add_argument("--config", help="configuration fields of new streams, as a JSON object or file")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: CUDA if available)")
    p.add_argument("--accel", metavar="NAMES",
                   help="accelerated forwards applied to the model at start, comma-separated names of "
                        "mukv.accel.KNOWN, e.g. fused_vision,fused_llm,fused_norms,fused_residual,fused_rope,"
                        "graph_prefill (default: none)")
    p.add_argument("--backend-options", metavar="JSON",
                   help='options of the lancedb backend, e.g. \'{"storage_options": {...}, "lease_ttl": 30}\'')
    p.add_argument("--token", help="bearer token every request must carry (default: $MUKV_SERVE_TOKEN); "
                                   "required for an address other than loopback")
    p.add_argument("--max-lag", type=float, metavar="SECONDS", help="seconds a frame may wait for ingest "
                                                                    "before it is dropped (default: 10)")
    p.add_argument("--max-queue-bytes", type=int, help="bytes of waiting frames per stream (default: 64 MiB)")
    p.add_argument("--max-batch-frames", type=int, help="frames of a stream per ingest step (default: 16)")
    p.add_argument("--batch-frames", type=int, metavar="N",
                   help="frames of all streams in one ingest step; a step this full runs at once (default: 256)")
    p.add_argument("--encode-batch-frames", type=int, metavar="N",
                   help="frames of one vision-tower batch inside an ingest step; each ends a stage where waiting "
                        "questions are answered (default: 64)")
    p.add_argument("--no-answer-during-steps", dest="answer_during_steps", action="store_false", default=None,
                   help="answer questions only between ingest steps, not at a step's stage boundaries")
    p.add_argument("--latency-target", type=float, metavar="SECONDS",
                   help="seconds from a frame's arrival to its blocks being searchable the engine aims at; at "
                        "most half of --max-lag is used (default: 5)")
    p.add_argument("--questions-per-step", type=int, metavar="N",
                   help="questions answered in a row while frames wait, before one ingest step (default: 4)")
    p.add_argument("--max-upload-bytes", type=int, help="largest request body (default: 64 MiB)")
    p.add_argument("--max-frame-pixels", type=int, help="largest frame, height x width (default: 4096*4096)")
    p.add_argument("--thumbnails", type=int, metavar="PX",
                   help="long side of the JPEG thumbnail kept per stored frame, 0 for none (default: 96)")
    p.add_argument("--drain", type=float, metavar="SECONDS",
                   help="on SIGTERM, seconds to go on ingesting frames already received (default: 30)")
    p.add_argument("--refresh", type=float, metavar="SECONDS",
                   help="seconds between looks at the store for other servers' commits, new streams and "
                        "streams to take over (default: 2)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")
    p.set_defaults(func=_cmd_serve)


def build_config(args: argparse.Namespace):
    from ..serve.config import ServeConfig
    from .common import _parse_config

    fields = {"store": args.store, "host": args.host, "port": args.port, "model": args.model,
              "config": _parse_config(args.config), "device": args.device, "token": args.token,
              "backend_options": _parse_config(args.backend_options, "--backend-options") or {}}
    if args.accel is not None:
        fields["accelerations"] = args.accel
    for flag, field in (("max_lag", "max_lag_s"), ("max_queue_bytes", "max_queue_bytes"),
                        ("max_batch_frames", "max_batch_frames"), ("max_upload_bytes", "max_upload_bytes"),
                        ("batch_frames", "batch_frames"), ("latency_target", "latency_target_s"),
                        ("questions_per_step", "questions_per_step"),
                        ("encode_batch_frames", "encode_batch_frames"),
                        ("answer_during_steps", "answer_during_steps"),
                        ("max_frame_pixels", "max_frame_pixels"), ("thumbnails", "thumbnails"),
                        ("drain", "drain_s"), ("refresh", "refresh_s")):
        value = getattr(args, flag)
        if value is not None:
            fields[field] = value
    return ServeConfig.build(**fields)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(f"mukv serve needs {exc.name}: pip install 'mukv[serve]'", name=exc.name) from None
    from ..serve.api_server import run

    run(build_config(args), log_level=args.log_level)
    return 0
