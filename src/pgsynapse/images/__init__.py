"""Images: decoding with limits, image models by path, the registry and search (issue 22)."""
