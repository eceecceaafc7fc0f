"""Generated gRPC stubs for the Edge Agent API (`make proto` regenerates them)."""

from . import edge_agent_pb2 as pb2
from . import edge_agent_pb2_grpc as pb2_grpc

__all__ = ["pb2", "pb2_grpc"]
