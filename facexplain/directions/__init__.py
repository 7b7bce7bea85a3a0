"""Directions in template space: paths between templates, interpretable axes (issue 5)."""
