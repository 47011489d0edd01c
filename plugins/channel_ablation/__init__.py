"""Channel ablation: zero a seeded set of output channels of chosen linear layers.

The smallest plugin that exercises the whole contract of :mod:`framework.plugin`: it adds a mask buffer to each
chosen layer in ``transform`` (so the mask is checkpointed with the model), keeps only scalar state on the
callback, switches on at a step of the schedule, logs under ``compression/channel_ablation/``, bakes the mask into
the weights on export and writes the masks beside the model. Researchers use it to ask how much a tower relies
on a fraction of its channels; plugin authors use it as the reference implementation.
"""

from plugins.channel_ablation.callback import ChannelAblation
from plugins.channel_ablation.layer import MASK_BUFFER, add_channel_mask, bake_channel_mask, channel_mask_of

__all__ = ["ChannelAblation", "MASK_BUFFER", "add_channel_mask", "bake_channel_mask", "channel_mask_of"]
