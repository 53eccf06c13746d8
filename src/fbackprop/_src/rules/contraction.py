"""Contractions: dot_general and convolutions, VJP and JVP rules side by side."""
