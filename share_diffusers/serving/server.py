"""``share-diffusers serve`` / ``python -m share_diffusers.serving``: the HTTP server on one machine.

    python -m share_diffusers.serving                       # the embedded demo model and its 4 styles, 127.0.0.1:8000
    python -m share_diffusers.serving --model black-forest-labs/FLUX.1-schnell --factors me/my-styles \\
        --device cuda --dtype bfloat16 --max-batch 8 --admin-token "$TOKEN"

Then ``curl -s 127.0.0.1:8000/v1/images/generations -H 'Content-Type: application/json'
-d '{"prompt": "a photo of a bag", "style": "tint", "seed": 1}'``. The admin token can also come from the
``SHARE_ADMIN_TOKEN`` environment variable (a command line is visible to every user of the machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..runtime import DTYPES, TINY_RANDOM, USER_ERRORS, check_server_options, error_line
from .engine import DEFAULT_MAX_UPLOAD_MB

ADMIN_TOKEN_ENV = "SHARE_ADMIN_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` flags, for this module's parser and the ``share-diffusers serve`` subcommand.

    Importing this module needs no FastAPI (the ``serve`` extra): :func:`run` imports the server.
    """
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        help="Flux repo id or folder (default: the embedded demo model, trained on Fashion-MNIST, with its styles "
        f"inverted, tint, stripes, outlines; {TINY_RANDOM}: the random-weight tiny pipeline)",
    )
    model.add_argument("--factors", help="Share checkpoint folder or Hub repo id (default: the model's demo styles)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 elsewhere")
    model.add_argument(
        "--quantize",
        metavar="KIND_OR_GGUF",
        help="quantize the transformer: int8 or float8 (torchao), nf4 (bitsandbytes, CUDA), or a .gguf file of it",
    )
    model.add_argument("--no-demo-styles", action="store_true", help="start without the demo styles")
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--max-batch", type=int, default=8, help="most images in one pipeline call (default 8)")
    server.add_argument(
        "--max-wait-ms",
        type=float,
        default=20.0,
        help="longest a request waits for others to join its batch (default 20)",
    )
    server.add_argument(
        "--max-queue", type=int, default=64, help="most images waiting; more are answered 503 (default 64)"
    )
    server.add_argument(
        "--admin-token",
        default=None,
        help=f"bearer token for POST/DELETE /v1/styles (default ${ADMIN_TOKEN_ENV}; unset: style management off; "
        "an empty one is refused)",
    )
    server.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest LoRA file merged, uploaded or from the Hub (default {DEFAULT_MAX_UPLOAD_MB})",
    )
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="share-diffusers serve",
        description="Serve Flux with Share styles over HTTP (OpenAI's images API); requests with different "
        "styles are denoised together in one batch.",
    )
    return add_arguments(parser)


def admin_token_of(args: argparse.Namespace) -> str | None:
    """The admin token from ``--admin-token``, else ``$SHARE_ADMIN_TOKEN``; None when neither is given.

    A blank one raises ValueError rather than turning admin calls on for an empty bearer or silently off:
    ``--admin-token "$TOKEN"`` with TOKEN unset is a mistake to report.
    """
    if args.admin_token is not None:
        token, source = args.admin_token, "--admin-token"
    elif ADMIN_TOKEN_ENV in os.environ:
        token, source = os.environ[ADMIN_TOKEN_ENV], f"${ADMIN_TOKEN_ENV}"
    else:
        return None
    if not token.strip():
        raise ValueError(
            f"{source} is empty (an unset shell variable?); give a secret token, or leave it out to keep "
            "style management off"
        )
    return token


def build_server_app(args: argparse.Namespace):
    """The app for parsed ``serve`` arguments (loads the model)."""
    from .api import create_app
    from .engine import ServingEngine

    if args.max_batch < 1 or args.max_queue < args.max_batch:
        raise ValueError(f"need 1 <= --max-batch <= --max-queue, got {args.max_batch} and {args.max_queue}")
    check_server_options(args.port, args.max_upload_mb)
    token = admin_token_of(args)  # before the model loads: a bad option fails at once
    engine = ServingEngine.from_model(
        args.model,
        args.factors,
        args.device,
        args.dtype,
        demo_styles=False if args.no_demo_styles else None,
        quantize=args.quantize,
        max_images=args.max_batch,
    )
    return create_app(
        engine,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        admin_token=token,
        max_upload_mb=args.max_upload_mb,
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted; bad options end with one ``error:`` line and status 1."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as error:
        print(f"error: serving needs the serve extra: pip install 'share-diffusers[serve]' ({error})", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        app = build_server_app(args)
    except USER_ERRORS as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 1
    engine = app.state.engine
    print(
        f"serving {len(engine.style_names)} styles ({', '.join(engine.style_names) or 'none'}) on "
        f"http://{args.host}:{args.port}/v1/images/generations",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``share-diffusers serve [flags]``; returns the exit status."""
    return run(build_parser().parse_args(argv))
