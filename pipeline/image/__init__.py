"""Stage 0, the photo: loading any common image file as RGB uint8 and writing PNGs atomically."""

from pipeline.image.load import MAX_PHOTO_PIXELS, load_photo, save_png

__all__ = ["MAX_PHOTO_PIXELS", "load_photo", "save_png"]
