"""The facexplain gRPC API as Python modules, one sub-package per API version."""
