"""mtrec-dist: distributed MTRec."""
__version__ = "0.1.0"
