"""igops: operations for a photo-sharing fleet."""

__version__ = "0.1.0"
