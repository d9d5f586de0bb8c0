"""The method: images, geometry, backbones, patch features, coreset, search, scoring, the model, persistence.

Nothing here imports from evaluation, serving or the command line."""
