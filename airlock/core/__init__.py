"""The application, with no gRPC and no syscalls of its own: configuration, request checks and
identity, the engine pipeline, the workflow and its state, and one function per RPC."""
