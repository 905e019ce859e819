"""The original DDPM initialisation, shared by every layer of the U-Net."""

import flax.linen as nn

# The original code initialises every kernel with variance scaling of scale 1 over the average of
# fan-in and fan-out (uniform), which differs from Flax's default lecun_normal.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros
