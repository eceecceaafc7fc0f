"""Client side of lookout-edge: a typed Python client for the Edge Agent API, and the camera
daemon (lookout_edge.client.camera)."""

from .edge_client import AnomalyArea, Detection, EdgeAgentClient, EdgeAgentError, ModelState

__all__ = ["AnomalyArea", "Detection", "EdgeAgentClient", "EdgeAgentError", "ModelState"]
