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


SHOWN_NAME_CHARS = 100


def shown(name: str) -> str:
    """`name` quoted for a message, cut short when long: a message echoing a huge name would
    exceed gRPC's metadata limit and reach the client as RESOURCE_EXHAUSTED instead."""
    if len(name) <= SHOWN_NAME_CHARS:
        return f"'{name}'"
    return f"'{name[:SHOWN_NAME_CHARS]}'…({len(name)} characters)"
