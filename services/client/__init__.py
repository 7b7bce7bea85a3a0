"""Python SDK and the ``facexplain`` command line."""
