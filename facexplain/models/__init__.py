"""Network definitions and weight loaders for the default and trained face models."""
