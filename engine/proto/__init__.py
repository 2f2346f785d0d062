"""Generated gRPC and protobuf modules (built by setup.py from proto/engine/proto/*.proto); do not edit."""
