"""Native TensorRT backend (the `tensorrt` extra, as JetPack ships it).

Builds an engine from the package's graph as TensorRT sees it (trt_graph.py: float32 input,
int32 label map, opset the parser reads), in FP16 where the GPU has fast FP16 unless the
precision is fp32, and caches it (engine_cache.py). Refuses, before building, a graph the
installed version's parser does not take, naming each operator and the version.

Device memory is allocated with the CUDA runtime (cuda.py) and freed by `close`, or by the
buffers' finalisers if the backend is dropped without it. Supports the TensorRT 8 binding API
and the TensorRT 10 named-tensor API.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookout_edge.contract import (
    CONFIDENCE_OUTPUT,
    INPUT_NAME,
    LABEL_MAP_OUTPUT,
    SCORE_OUTPUT,
    check_graph_io,
    onnx_graph_io,
)
from lookout_edge.package import ModelPackage, PackageError

from . import cuda
from .base import BackendUnavailable, GpuOutOfMemory, Inference
from .engine_cache import EngineCache, EngineKey

WORKSPACE_BYTES = 1 << 30


class TensorRTModel:
    """A TensorRT engine for one package, on `gpu` (the device the selector probed)."""

    name = "tensorrt"
    status_note = ""

    def __init__(
        self, package: ModelPackage, gpu: cuda.GpuInfo | None, engine_cache_dir: Path, precision: str = "auto"
    ) -> None:
        # The `tensorrt` extra: tensorrt, and onnx, which trt_graph needs at import.
        import onnx
        import tensorrt as trt

        from .trt_graph import check_graph, support_for, tensorrt_variant

        if gpu is None:
            raise BackendUnavailable("TensorRT is installed but no CUDA device was found")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        support = support_for(trt.__version__)
        graph = onnx.load(str(package.model_file.path))
        inputs, outputs = onnx_graph_io(graph)
        check_graph_io(
            inputs, outputs, package.width, package.height, package.is_segmentation, package.model_file.path
        )
        variant = tensorrt_variant(graph, support.max_opset)
        problems = check_graph(variant, support)
        if problems:
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} cannot take this graph: " + "; ".join(problems)
            )
        builder = trt.Builder(self._logger)
        fp16 = precision == "fp16" or (precision == "auto" and builder.platform_has_fast_fp16)
        key = EngineKey(
            model_sha256=package.model_file.sha256,
            tensorrt_version=trt.__version__,
            compute_capability=f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
            precision="fp16" if fp16 else "fp32",
        )
        runtime = trt.Runtime(self._logger)
        self._engine = EngineCache(engine_cache_dir).load_or_build(
            key,
            lambda: self._build(builder, variant.SerializeToString(), fp16),
            lambda data: runtime.deserialize_cuda_engine(data),
        )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise GpuOutOfMemory("TensorRT could not create an execution context (out of GPU memory)")
        self._lock = threading.Lock()  # one execution context: one inference at a time
        self._height, self._width = package.height, package.width
        self._buffers: dict[str, cuda.DeviceBuffer] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
        try:
            for name in self._tensor_names():
                shape = tuple(self._tensor_shape(name))
                dtype = np.dtype(trt.nptype(self._tensor_dtype(name)))
                self._shapes[name] = (shape, dtype)
                self._buffers[name] = cuda.DeviceBuffer(int(np.prod(shape)) * dtype.itemsize)
        except cuda.CudaError as exc:
            self.close()
            if exc.out_of_memory:
                raise GpuOutOfMemory(f"not enough GPU memory for the model's buffers: {exc}") from None
            raise
        self._outputs = [
            name for name in (SCORE_OUTPUT, CONFIDENCE_OUTPUT, LABEL_MAP_OUTPUT) if name in self._shapes
        ]

    def _build(self, builder: Any, graph: bytes, fp16: bool) -> bytes:
        trt = self._trt
        flags = (
            1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
            else 0
        )
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(graph):
            errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
            raise PackageError(f"TensorRT's ONNX parser rejected the graph: {errors}")
        config = builder.create_builder_config()
        if hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        else:
            config.max_workspace_size = WORKSPACE_BYTES
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT could not build an engine for this graph; see the agent log")
        return bytes(serialized)

    # TensorRT 10 names tensors; TensorRT 8 numbers bindings. Both are handled here.
    def _tensor_names(self) -> list[str]:
        engine = self._engine
        if hasattr(engine, "num_io_tensors"):
            return [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        return [engine.get_binding_name(index) for index in range(engine.num_bindings)]

    def _tensor_shape(self, name: str) -> Sequence[int]:
        engine = self._engine
        if hasattr(engine, "get_tensor_shape"):
            return list(engine.get_tensor_shape(name))
        return list(engine.get_binding_shape(engine.get_binding_index(name)))

    def _tensor_dtype(self, name: str) -> Any:
        engine = self._engine
        if hasattr(engine, "get_tensor_dtype"):
            return engine.get_tensor_dtype(name)
        return engine.get_binding_dtype(engine.get_binding_index(name))

    def _execute(self) -> None:
        context = self._context
        if hasattr(context, "set_tensor_address"):
            for name, buffer in self._buffers.items():
                context.set_tensor_address(name, buffer.pointer.value)
            ok = context.execute_async_v3(0)
        else:
            ok = context.execute_v2([self._buffers[name].pointer.value for name in self._tensor_names()])
        if not ok:
            raise RuntimeError("TensorRT inference failed; see the agent log")

    def run(self, image: np.ndarray) -> Inference:
        host_input = np.ascontiguousarray(image, dtype=np.float32)
        results = {}
        with self._lock:
            self._buffers[INPUT_NAME].upload(host_input.tobytes())
            self._execute()
            for name in self._outputs:
                shape, dtype = self._shapes[name]
                host = ctypes.create_string_buffer(self._buffers[name].size)
                self._buffers[name].download(host)
                results[name] = np.frombuffer(host.raw, dtype=dtype).reshape(shape)
        label_map = results.get(LABEL_MAP_OUTPUT)
        confidence = results.get(CONFIDENCE_OUTPUT)
        return Inference(
            anomaly_score=float(results[SCORE_OUTPUT].reshape(-1)[0]),
            confidence=None if confidence is None else float(confidence.reshape(-1)[0]),
            label_map=None
            if label_map is None
            else label_map.reshape(self._height, self._width).astype(np.uint8),
        )

    def close(self) -> None:
        """Free the device buffers, the execution context and the engine."""
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers = {}
        self._context = None
        self._engine = None
