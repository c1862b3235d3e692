"""The quantization pipeline, in parts a reader can name:

- ``model.py``: the decoder layers, the linear modules quantized in each, how they group by shared input, the
  inputs a module sees;
- ``shards.py``: the calibration set in virtual shards (the unit of data parallelism) and their micro-batches;
- ``world.py``: one process or the ranks of ``torchrun``, and the collectives (Hessian sums added in shard order,
  solved modules shared);
- ``schedule.py``: which rank solves which module;
- ``state.py``: what a finished layer commits for resuming;
- ``run.py``: ``quantize_model``, the layer loop (layers from the model in memory; results into its modules);
- ``streamed.py``: ``quantize_folder``, the same loop with layers read from disk and results written to shards.
"""

from .model import decoder_layers
from .run import METHODS, QuantizeStats, quantize_model

__all__ = ["METHODS", "QuantizeStats", "decoder_layers", "quantize_model"]
