"""lookout-edge: a self-hosted, wire-compatible replacement for the Lookout for Vision edge stack."""

__version__ = "0.1.0"

DEFAULT_SOCKET = "unix:///tmp/aws.iot.lookoutvision.EdgeAgent.sock"
