"""Stage 2, masks -> objects: lifters that turn photo + mask into posed 3D Gaussians."""
