"""Generated protobuf and gRPC stubs; regenerate with `python proto/generate.py`."""
