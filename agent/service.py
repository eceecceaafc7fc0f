"""The gRPC servicer: maps the Edge Agent RPCs onto the model registry."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from lookout_edge import shm
from lookout_edge.protocol import pb2, pb2_grpc

from .detect import detect_anomalies
from .errors import AgentError, InvalidArgument
from .metrics import AgentMetrics
from .models import ModelInfo, ModelRegistry

log = logging.getLogger(__name__)
Response = TypeVar("Response")


def _rpc(
    method: Callable[[EdgeAgentServicer, Any, grpc.ServicerContext], Response],
) -> Callable[..., Response]:
    """Turn AgentError into its status code, and anything unexpected into INTERNAL (logged);
    count the call and its time in the metrics, by the status code it ends with."""

    @functools.wraps(method)
    def wrapper(self: EdgeAgentServicer, request: Any, context: grpc.ServicerContext) -> Response:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidArgument(request.message)
            return method(self, request, context)
        except AgentError as exc:
            code = exc.code
            context.abort(exc.code, exc.message)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed unexpectedly", method.__name__)
            context.abort(code, f"{method.__name__} failed inside the agent; see the agent log")
        finally:
            # ListModels and a MalformedRequest name no model.
            model = getattr(request, "model_component", "")
            self.metrics.observe_call(method.__name__, model, code, time.perf_counter() - started)
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


class MalformedRequest:
    """What a request that protobuf cannot parse becomes: `_rpc` answers it INVALID_ARGUMENT.

    A deserializer that raised would make gRPC answer INTERNAL and log a traceback per call.
    """

    def __init__(self, message_type: str, error: DecodeError) -> None:
        self.message = (
            f"the request is not a valid {message_type} message ({error}); "
            "build the client's stubs from the Edge Agent's edge-agent.proto"
        )


def _request_deserializer(descriptor: Descriptor) -> Callable[[bytes], Message | MalformedRequest]:
    message_class = GetMessageClass(descriptor)

    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(descriptor.name, exc)

    return deserialize


def add_to_server(servicer: EdgeAgentServicer, server: grpc.Server) -> None:
    """Register the service's RPCs, as the generated `add_EdgeAgentServicer_to_server` does
    (the same service and method names, from the proto's descriptor), with deserializers that
    turn an unparsable request into a `MalformedRequest`."""
    service = pb2.DESCRIPTOR.services_by_name["EdgeAgent"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_request_deserializer(method.input_type),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _required_name(request: Any) -> str:
    if not request.model_component:
        raise InvalidArgument("model_component is empty; pass the model's component name")
    return str(request.model_component)


def _description(info: ModelInfo) -> pb2.ModelDescription:
    return pb2.ModelDescription(
        model_component=info.name,
        lookout_vision_model_arn=info.model_arn,
        status=info.status,  # type: ignore[arg-type]
        status_message=info.status_message,
    )


class EdgeAgentServicer(pb2_grpc.EdgeAgentServicer):
    def __init__(self, registry: ModelRegistry, metrics: AgentMetrics) -> None:
        self.registry = registry
        self.metrics = metrics
        # Whose shared memory the agent may use for its callers: the server sets it from the
        # socket once that exists; until then, the strictest rule (the agent's own group).
        self.shm_access: shm.SegmentAccess | None = shm.SegmentAccess(os.getegid(), None)

    @_rpc
    def DetectAnomalies(
        self, request: pb2.DetectAnomaliesRequest, context: grpc.ServicerContext
    ) -> pb2.DetectAnomaliesResponse:
        response = detect_anomalies(self.registry, request, self.shm_access)
        if response.detect_anomaly_result.is_anomalous:
            self.metrics.count_anomalous(request.model_component)
        return response

    @_rpc
    def DescribeModel(
        self, request: pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> pb2.DescribeModelResponse:
        info = self.registry.describe(_required_name(request))
        return pb2.DescribeModelResponse(model_description=_description(info))

    @_rpc
    def ListModels(
        self, request: pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb2.ListModelsResponse:
        models = [
            pb2.ModelMetadata(
                model_component=info.name,
                lookout_vision_model_arn=info.model_arn,
                status=info.status,  # type: ignore[arg-type]
                status_message=info.status_message,
            )
            for info in self.registry.list()
        ]
        return pb2.ListModelsResponse(models=models)

    @_rpc
    def StartModel(
        self, request: pb2.StartModelRequest, context: grpc.ServicerContext
    ) -> pb2.StartModelResponse:
        return pb2.StartModelResponse(status=self.registry.start(_required_name(request)))  # type: ignore[arg-type]

    @_rpc
    def StopModel(
        self, request: pb2.StopModelRequest, context: grpc.ServicerContext
    ) -> pb2.StopModelResponse:
        return pb2.StopModelResponse(status=self.registry.stop(_required_name(request)))  # type: ignore[arg-type]
