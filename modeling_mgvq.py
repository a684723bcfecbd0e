"""A model saved by `mgvq.py` for transformers alone: this file and `kernels.py` are copied into every saved
folder, and its config.json names the class below in `auto_map`, so that in a process that knows nothing of
this project

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

is the quantized Qwen2-VL, with a `VQLinear` wherever `mgvq.py` replaced a linear. transformers imports this
file from the saved folder as a package (hence the relative import); nothing in this project imports it.
"""
import torch
from transformers import Qwen2VLForConditionalGeneration

from .kernels import VQLinear


class Qwen2VLMGVQForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose quantized linears are VQLinear. Their layouts (shape, d, group size, bits per column
    group, tile rows) are in config.json, `mgvq_layouts`, because from_pretrained builds the modules from the
    config before it reads model.safetensors: the packed buffers then load into them like any weight."""

    def __init__(self, config):
        super().__init__(config)
        dtype = torch.get_default_dtype()      # from_pretrained builds the model under the dtype it was asked for
        for name, layout in config.mgvq_layouts.items():
            parent, child = name.rsplit(".", 1)
            setattr(self.get_submodule(parent), child, VQLinear(**{**layout, "dtype": dtype}))
