"""Early NDVI fusion (the failure diagnosis, 2.4.1): the image's Pre_GSHH_NDVI as a 4th input channel.

The backbone's first convolution (the ViT patch embedding, ConvNeXt's stem) is widened by one input channel:
out = conv(rgb) + extra(ndvi plane), `extra`'s weights starting at zero, so the pretrained behaviour is kept at
start; the pretrained RGB weights keep their trainability (frozen with the backbone), the new channel's train. The
channel is the standardised NDVI (training-split mean / std), constant over the image; 0 (the mean) where the table
has no value for the image.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class WidenedConv(nn.Module):
    """`conv` reading `extra` more input channels: conv(x[:, :C]) + extra(x[:, C:]), extra zero-initialised."""

    def __init__(self, conv: nn.Conv2d, extra: int):
        super().__init__()
        self.conv, self.in_rgb = conv, conv.in_channels
        self.extra = nn.Conv2d(extra, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                               bias=False)
        nn.init.zeros_(self.extra.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x[:, :self.in_rgb]) + self.extra(x[:, self.in_rgb:])


def widen_first_conv(model: nn.Module, extra: int) -> WidenedConv:
    """Replace the first 3-channel Conv2d of `model` (in module order) by a WidenedConv, in place."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            parent_name, _, child = name.rpartition(".")
            widened = WidenedConv(module, extra)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, widened)
            return widened
    raise ValueError(f"model.early_ndvi: {type(model).__name__} has no 3-channel convolution to widen")


def ndvi_plane(batch: dict, mean: float, std: float, like: Tensor) -> Tensor:
    """(B, 1, H, W): the standardised NDVI of each image, 0 where it is missing."""
    value = (torch.nan_to_num(batch["ndvi"].float()) - mean) / std * batch["ndvi_mask"].float()
    return value.to(like).view(-1, 1, 1, 1).expand(-1, 1, *like.shape[-2:])
