"""The same three nodes in ComfyUI's v3 node schema (``comfy_api.latest``):
``comfy_entrypoint()`` returns a ``ComfyExtension`` whose nodes are built from the
classic classes in ``nodes.py`` (their ``INPUT_TYPES``, ``RETURN_TYPES``, category and
flags), so both forms stay one definition.

ComfyUI's loader reads a pack's ``NODE_CLASS_MAPPINGS`` when it has one and its
``comfy_entrypoint`` otherwise; the package exports both, so the classic form is the
one used where both are accepted, and a loader that only takes v3 finds this one."""

from __future__ import annotations

from . import nodes as classic

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # outside ComfyUI, or a ComfyUI without the v3 API
    ComfyExtension = io = None

_DATA_TYPES = {"MODEL": "Model", "LATENT": "Latent", "CONDITIONING": "Conditioning"}


def _input(name: str, spec: tuple, optional: bool):
    kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    common = {"optional": optional, "tooltip": opts.get("tooltip")}
    if isinstance(kind, list):
        return io.Combo.Input(name, options=kind, default=opts.get("default"), **common)
    if kind in ("INT", "FLOAT"):
        cls = io.Int if kind == "INT" else io.Float
        return cls.Input(name, default=opts.get("default"), min=opts.get("min"),
                         max=opts.get("max"), step=opts.get("step"),
                         force_input=opts.get("forceInput"), **common)
    if kind == "BOOLEAN":
        return io.Boolean.Input(name, default=opts.get("default"), **common)
    if kind == "STRING":
        return io.String.Input(name, default=opts.get("default"),
                               multiline=bool(opts.get("multiline", False)), **common)
    if kind in _DATA_TYPES:
        return getattr(io, _DATA_TYPES[kind]).Input(name, **common)
    return io.Custom(kind).Input(name, **common)


def _output(kind: str, name: str):
    if kind == "INT":
        return io.Int.Output(display_name=name)
    return io.Custom(kind).Output(display_name=name)


def v3_node(node_id: str, cls: type) -> type:
    """A v3 ``ComfyNode`` with ``cls``'s inputs, outputs and flags, running its
    function."""
    types = cls.INPUT_TYPES()
    inputs = [_input(name, spec, optional)
              for optional, group in ((False, types.get("required", {})),
                                      (True, types.get("optional", {})))
              for name, spec in group.items()]
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    outputs = [_output(kind, name) for kind, name in zip(cls.RETURN_TYPES, names,
                                                          strict=True)]

    def define_schema(_cls):
        return io.Schema(node_id=node_id,
                         display_name=classic.NODE_DISPLAY_NAME_MAPPINGS[node_id],
                         category=cls.CATEGORY, description=getattr(cls, "DESCRIPTION", ""),
                         inputs=inputs, outputs=outputs,
                         is_input_list=bool(getattr(cls, "INPUT_IS_LIST", False)),
                         is_output_node=bool(getattr(cls, "OUTPUT_NODE", False)))

    def execute(_cls, **kwargs):
        result = getattr(cls(), cls.FUNCTION)(**kwargs)
        return io.NodeOutput(*result) if isinstance(result, tuple) else io.NodeOutput()

    return type(cls.__name__ + "V3", (io.ComfyNode,),
                {"define_schema": classmethod(define_schema),
                 "execute": classmethod(execute), "__doc__": cls.__doc__})


if ComfyExtension is not None:
    class LoraEngineExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return [v3_node(node_id, cls)
                    for node_id, cls in classic.NODE_CLASS_MAPPINGS.items()]

    def comfy_entrypoint() -> ComfyExtension:
        return LoraEngineExtension()
