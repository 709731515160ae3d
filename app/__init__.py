"""nextact: next-action prediction service (FastAPI + Redis + ONNX Runtime)."""

__version__ = "0.1.0"
