"""Turn detectors into contract ONNX graphs (needs the ``export`` extra: torch, onnx)."""
