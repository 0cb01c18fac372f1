"""Adapter bases and the network that puts adapters on a model."""

from loraengine.core.adapter.layer import (
    ADAPTABLE,
    DELTA_KEYS,
    NORMS,
    TRAFFIC_FLOPS,
    AdapterLayer,
    AttachMode,
    ChannelDelta,
    TrainingPath,
    bias_of,
    layer_dims,
    layer_op,
    split_deltas,
    weight_of,
)
from loraengine.core.adapter.network import AdapterNetwork, select_layers

__all__ = ["ADAPTABLE", "DELTA_KEYS", "NORMS", "TRAFFIC_FLOPS", "AdapterLayer", "AdapterNetwork", "AttachMode",
           "ChannelDelta", "TrainingPath", "bias_of", "layer_dims", "layer_op", "select_layers",
           "split_deltas", "weight_of"]
