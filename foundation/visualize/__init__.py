"""``foundation visualize``: what a backbone sees, as pictures (the figures of DINO and DINOv2).

PCA of patch tokens as RGB (DINOv2, arXiv 2304.07193, Fig. 1), CLS attention of the last block per head
(DINO, arXiv 2104.14294), cleaner with registers (arXiv 2309.16588). Domains turn their inputs into tensors
through a ``visual_inputs`` hook (:mod:`foundation.visualize.inputs`); everything else is domain-agnostic.
"""
