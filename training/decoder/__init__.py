"""Deep Face Decoder training: ``facexplain train decoder`` (see ``training.decoder.run``)."""
