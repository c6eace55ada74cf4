"""Organ segmentation (issue 7): a UNETR-style decoder on the 3D ViT, fine-tuned with MONAI losses and metrics."""
