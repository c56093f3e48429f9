"""hetrain: train transformer language models on the hardware a user really has.

The package decides where every tensor lives and when every operation runs (a Plan), then
executes it. Model code (hetrain.model) knows nothing about training or placement; each
technique applies itself to a plain nn.Module from outside.
"""

__version__ = "0.1.0"
