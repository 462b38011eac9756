"""Features: image -> canvas, backbones (DINOv2 through timm, a weights-free DAISY), the Zarr feature cache."""
