"""Errors that map onto the gRPC status codes of the Edge Agent API reference."""

from __future__ import annotations

import grpc


class AgentError(Exception):
    """An error the caller can act on: a status code from the API reference and a message."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AgentError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(AgentError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(AgentError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(AgentError):
    code = grpc.StatusCode.FAILED_PRECONDITION
