"""Regenerate the Python stubs in lookout_edge/protocol from proto/edge-agent.proto.

protoc names modules after the .proto file and imports them as top-level modules; the
stubs live inside a package, so the one generated import is rewritten to a relative one.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "edge-agent.proto"
OUT = ROOT / "lookout_edge" / "protocol"


def main(out: Path = OUT) -> int:
    """Write the stubs into `out` (the package by default; tests pass a scratch directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        # protoc derives module names from the file name; edge-agent -> edge_agent.
        source = Path(tmp) / "edge_agent.proto"
        source.write_text(PROTO.read_text())
        status = protoc.main(
            [
                "protoc",
                f"-I{tmp}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(source),
            ]
        )
        if status != 0:
            print(f"protoc failed with status {status}", file=sys.stderr)
            return status
        for name in ("edge_agent_pb2.py", "edge_agent_pb2.pyi", "edge_agent_pb2_grpc.py"):
            text = (Path(tmp) / name).read_text()
            text = re.sub(r"^import edge_agent_pb2 as", "from . import edge_agent_pb2 as", text, flags=re.M)
            (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
