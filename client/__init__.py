"""Client side of lookout-edge: a typed Python client for the Edge Agent API."""
