"""Readers for the face data sets and identity-disjoint splits."""
