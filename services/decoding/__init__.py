"""DecodingService: templates -> face images with a registered Deep Face Decoder (DFD)."""
