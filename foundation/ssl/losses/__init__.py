"""SSL losses of DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193) and teacher centering."""

from foundation.ssl.losses.centering import SoftmaxCenter, sinkhorn_knopp
from foundation.ssl.losses.dino_cls_loss import DINOClsLoss
from foundation.ssl.losses.ibot_patch_loss import IBOTPatchLoss
from foundation.ssl.losses.koleo_loss import KoLeoLoss

__all__ = ["DINOClsLoss", "IBOTPatchLoss", "KoLeoLoss", "SoftmaxCenter", "sinkhorn_knopp"]
