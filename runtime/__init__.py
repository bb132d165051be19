"""What runs a contract model in-process, for every executor: the ONNX Runtime backend
and the detections it answers (split per image, thresholded, normalised)."""
