"""`lookout-edge camera`: IP cameras → shared memory → DetectAnomalies → events (docs/camera.md)."""
