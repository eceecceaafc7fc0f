"""The lookout-edge Edge Agent: a gRPC server that runs model packages."""
