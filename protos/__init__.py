"""Generated gRPC stubs live here (`make protos`); the contract is booth.proto."""
