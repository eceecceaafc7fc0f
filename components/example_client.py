"""Example client application, shipped as an artifact of the lookout_edge.ExampleClient component.

Like the guide's lookoutvision_edge_agent_example.py it talks to the agent through the gRPC
stubs alone: it lists the deployed models, starts one, runs DetectAnomalies on an image and
prints the result, which lands in the component's log. It runs with the agent component's
Python environment, which holds the stubs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import grpc
import numpy as np
from PIL import Image

from lookout_edge.protocol import pb2, pb2_grpc


def _wait_running(stub: pb2_grpc.EdgeAgentStub, model: str, deadline: float) -> None:
    """Start the model unless it runs already, waiting for its package to reach the agent."""
    while time.monotonic() < deadline:
        try:
            description = stub.DescribeModel(
                pb2.DescribeModelRequest(model_component=model)
            ).model_description
            if description.status == pb2.RUNNING:
                return
            if description.status == pb2.FAILED:
                raise RuntimeError(f"model {model} FAILED: {description.status_message}")
            if description.status == pb2.STOPPED:
                stub.StartModel(pb2.StartModelRequest(model_component=model))
        except grpc.RpcError as error:
            # NOT_FOUND: the model component has not placed its package yet. FAILED_PRECONDITION:
            # someone else (the agent's StartModels) started it first.
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise
        time.sleep(0.2)
    raise TimeoutError(f"model {model} is not RUNNING after the timeout")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, help="the agent's unix: address")
    parser.add_argument("--model", required=True, help="model component name")
    parser.add_argument("--image", required=True, help="image file to inspect")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the agent and the model"
    )
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.timeout
    image = np.asarray(Image.open(args.image).convert("RGB"))
    with grpc.insecure_channel(args.socket) as channel:
        # Greengrass starts this component as soon as the agent's process runs, before it listens.
        grpc.channel_ready_future(channel).result(timeout=args.timeout)
        stub = pb2_grpc.EdgeAgentStub(channel)
        for model in stub.ListModels(pb2.ListModelsRequest()).models:
            print(f"Model Details {model.model_component} {pb2.ModelStatus.Name(model.status)}", flush=True)
        _wait_running(stub, args.model, deadline)
        response = stub.DetectAnomalies(
            pb2.DetectAnomaliesRequest(
                model_component=args.model,
                bitmap=pb2.Bitmap(width=image.shape[1], height=image.shape[0], byte_data=image.tobytes()),
            )
        )
    result = response.detect_anomaly_result
    record = {
        "model_component": args.model,
        "image": args.image,
        "is_anomalous": result.is_anomalous,
        "confidence": round(result.confidence, 6),
        "anomaly_score": round(result.anomaly_score, 6),
        "anomaly_threshold": round(result.anomaly_threshold, 6),
    }
    print(f"DetectAnomalies result: {json.dumps(record)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
