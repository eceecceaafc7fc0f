"""An Amazon Rekognition Custom Labels endpoint: the AWS JSON 1.1 API that botocore's `rekognition`
client speaks, serving the Custom Labels packages of a models directory (docs/custom-labels.md).

Importing this package is cheap (the typed client imports `sigv4` from it); the server, ONNX
Runtime included, loads only when `cli.run` or `server.RekognitionServer` is used.
"""
