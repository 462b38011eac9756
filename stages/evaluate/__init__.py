"""Evaluation science: PCK for keypoint transfer (pck) and the official TSS dense-flow protocol (tss)."""
