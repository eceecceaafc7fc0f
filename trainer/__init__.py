"""Model training: a frozen pretrained feature backbone, exported as an ONNX graph for the agent."""
