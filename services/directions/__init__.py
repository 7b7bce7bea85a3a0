"""DirectionsService: discover, store, register and apply interpretable directions in template space."""
