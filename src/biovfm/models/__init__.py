"""The ViT ladder on timm."""
from biovfm.models.vit import build_encoder, count_flops_per_image, encoder_params, paper_params

__all__ = ["build_encoder", "count_flops_per_image", "encoder_params", "paper_params"]
