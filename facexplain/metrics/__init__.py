"""Measures: verification rules and scores, identification, image quality."""
