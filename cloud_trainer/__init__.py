"""dancebooth cloud: ingest, corpus, training, rendering and delivery."""

__version__ = "0.1.0"
