"""Text sources and tokenization into fixed-length contexts."""
