"""What the edge and the core both speak: envelope, topics, link, config."""

__version__ = "0.1.0"
