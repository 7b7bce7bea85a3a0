"""What every facexplain gRPC service shares: settings, bootstrap, errors, limits, metrics, logging."""
