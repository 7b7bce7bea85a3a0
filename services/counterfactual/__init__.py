"""The counterfactual gRPC service: adversarial counterfactuals, attribute significance, decoder as defence."""
