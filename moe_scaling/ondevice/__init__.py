"""On-device runtimes: our models exported to ONNX Runtime (INT4 weights) and run on this CPU."""
