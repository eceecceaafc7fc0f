"""Generated gRPC stubs for the Edge Agent API (`make proto` regenerates them), and the
channel options both ends of the socket use."""

from lookout_edge.package import MAX_SIDE

from . import edge_agent_pb2 as pb2
from . import edge_agent_pb2_grpc as pb2_grpc

__all__ = ["GRPC_MESSAGE_OPTIONS", "MAX_MESSAGE_BYTES", "pb2", "pb2_grpc"]

# A request with the largest bitmap (4096 x 4096 RGB888 is 48 MiB) and a reply with its mask
# as bytes must both fit; gRPC's default limit is 4 MiB.
MAX_MESSAGE_BYTES = MAX_SIDE * MAX_SIDE * 3 + (1 << 20)
GRPC_MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
