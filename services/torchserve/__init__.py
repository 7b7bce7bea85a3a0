"""TorchServe as an export target: ``.mar`` archives of registered embedder and decoder versions.

``export`` resolves a version in the registry and packs its verified bundle with ``facexplain_handler``
(which runs the same ``facexplain`` code the gRPC services run) and TorchServe's batching settings;
``client`` is the caller's side (REST and TorchServe's own gRPC API) that the parity test and the serving
benchmark share. Nothing here imports TorchServe: it is an optional install (``make setup-torchserve``).
"""

# TorchServe's batching, as the issue measured it on 2 CPU cores: 16 images or 50 ms, whichever comes first.
# Here (not in ``export``) so the CLI can show them without importing the registry or torch.
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_BATCH_DELAY_MS = 50
DEFAULT_RESPONSE_TIMEOUT_S = 300
