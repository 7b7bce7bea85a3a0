"""facexplain gRPC services: one package per service, plus kit/ (shared server plumbing) and client/."""
