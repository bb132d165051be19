"""gRPC inference server (ONNX Runtime, dynamic batching)."""
