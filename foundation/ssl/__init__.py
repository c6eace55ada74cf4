"""Self-supervised objectives (DINOv2, arXiv 2304.07193; MAE, arXiv 2111.06377): losses and masking."""
