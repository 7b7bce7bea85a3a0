"""AttributesService: attributes recovered from templates (decode, then estimate) and their MI importance."""
