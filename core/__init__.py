"""pretag: pretagging of driving-scene images with an ONNX detector behind a gRPC server."""

__version__ = "0.1.0"
