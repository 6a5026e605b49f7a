"""Wire protocols over ServerCore: HTTP/REST and gRPC."""
