"""Shared networks."""
from bench_core.nets.unet import DDPM_CIFAR10, DIGITS_SMALL, PRESETS, UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "DDPM_CIFAR10", "DIGITS_SMALL", "PRESETS"]
