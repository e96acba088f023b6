"""The labelled command corpus (see README.md) and its reader (loader.py)."""
