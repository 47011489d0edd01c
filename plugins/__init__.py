"""Compression techniques, one package each; each depends on framework/ only."""
