"""DINO-family self-distillation: head, losses and the method (student, EMA teacher, multi-crop)."""
from biovfm.methods.dino.method import DINO

__all__ = ["DINO"]
