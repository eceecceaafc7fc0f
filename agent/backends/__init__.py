"""Inference backends: what runs a model package, and the choice between them.

- `base`: the `Backend` interface every backend implements, its result and its errors, and the
  agent's accelerator setting names;
- `ort_backend`: ONNX Runtime, on the CPU or with the CUDA or TensorRT execution providers;
- `trt_backend`: native TensorRT (with `trt_graph`, the graph TensorRT builds from, and
  `engine_cache`, the built engines on disk);
- `cuda`: the GPU boundary, through the CUDA runtime library;
- `selector`: `BackendSelector`, which picks and loads the backend for each package.

Nothing is imported here, so that `base` stays cheap to import (agent/config.py reads it).
"""
