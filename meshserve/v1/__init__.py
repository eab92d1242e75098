"""Generated protobuf and gRPC stubs for meshserve.v1 (do not edit; see protos/)."""
