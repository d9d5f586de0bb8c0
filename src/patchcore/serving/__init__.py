"""The HTTP inference service: model loading, decoding guards, inference slots, routes, metrics."""
