"""`lookout-edge rekognition`: serve a models directory's Custom Labels packages over the
Rekognition API until SIGINT or SIGTERM.

The access key may come from the environment (LOOKOUT_EDGE_REKOGNITION_ACCESS_KEY_ID and
LOOKOUT_EDGE_REKOGNITION_SECRET_ACCESS_KEY), which keeps the secret out of the process list.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lookout_edge.custom_labels import DEFAULT_ACCOUNT, DEFAULT_REGION

DEFAULT_ADDRESS = "127.0.0.1:8480"
KEY_ID_VARIABLE = "LOOKOUT_EDGE_REKOGNITION_ACCESS_KEY_ID"
SECRET_VARIABLE = "LOOKOUT_EDGE_REKOGNITION_SECRET_ACCESS_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, required=True, help="the model packages to serve")
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"HOST:PORT to listen on (default {DEFAULT_ADDRESS})"
    )
    parser.add_argument(
        "--s3-root", type=Path, help="a folder standing for S3: s3://BUCKET/NAME is S3_ROOT/BUCKET/NAME"
    )
    parser.add_argument(
        "--access-key-id",
        default=os.environ.get(KEY_ID_VARIABLE) or None,
        help=f"verify signatures made with this key (or ${KEY_ID_VARIABLE}); without one, accept any",
    )
    parser.add_argument(
        "--secret-access-key",
        default=os.environ.get(SECRET_VARIABLE) or None,
        help=f"the key's secret (or ${SECRET_VARIABLE})",
    )
    parser.add_argument(
        "--region",
        default=DEFAULT_REGION,
        help=f"the region of ARNs and signatures (default {DEFAULT_REGION})",
    )
    parser.add_argument("--account", default=DEFAULT_ACCOUNT, help="the 12-digit account of new ARNs")
    parser.add_argument(
        "--queue",
        type=int,
        default=8,
        help="requests that may wait for a model's inference units (default 8)",
    )
    parser.add_argument(
        "--read-timeout", type=float, default=10.0, help="seconds a client has to send a request (default 10)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def add_parser(subcommands: Any) -> argparse.ArgumentParser:
    """Add the `rekognition` subcommand to the lookout-edge CLI's subparsers."""
    parser: argparse.ArgumentParser = subcommands.add_parser(
        "rekognition", help="serve Custom Labels models over the Amazon Rekognition API (boto3, AWS CLI)"
    )
    add_arguments(parser)
    return parser


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--address {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    from .operations import EndpointConfig, Service
    from .registry import RegistryError
    from .server import RekognitionServer
    from .sigv4 import Credentials

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = "lookout-edge rekognition"
    try:
        address = _address(args.address)
        if (args.access_key_id is None) != (args.secret_access_key is None):
            raise ValueError("give both --access-key-id and --secret-access-key, or neither")
        if args.queue < 0 or args.read_timeout <= 0:
            raise ValueError("--queue must be 0 or more and --read-timeout positive")
        if not args.models_dir.is_dir():
            raise ValueError(f"--models-dir {args.models_dir} is not a directory")
        if not (args.account.isdigit() and len(args.account) == 12):
            raise ValueError(f"--account {args.account!r} must be 12 digits")
        credentials = (
            None if args.access_key_id is None else Credentials(args.access_key_id, args.secret_access_key)
        )
        config = EndpointConfig(args.models_dir, args.s3_root, args.region, args.account, args.queue)
        server = RekognitionServer(Service(config), address, credentials, args.read_timeout)
    except (ValueError, RegistryError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    logging.getLogger(__name__).info("serving %s on %s", args.models_dir, server.url)
    print(f"{prog}: serving {args.models_dir} on {server.url}", file=sys.stderr, flush=True)
    stop.wait()
    server.close()
    return 0
