"""i2p2i: image → prompt → image with CLIP Interrogator and Stable Diffusion."""

__version__ = "0.1.0"
