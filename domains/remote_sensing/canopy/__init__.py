"""Canopy height from imagery: a DPT head on the ViT, trained with ``foundation finetune canopy-height``."""
