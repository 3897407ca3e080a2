"""The artifact format's names and version, shared by save, load and the CLI."""

import torch

FORMAT = "stfuse-artifact"
# 2: programs are torch.export's JSON schema text (programs/<name>.json), never archives.
# Version 1 stored torch.export.save zip archives, which torch's own zip reader parsed
# differently from the checks; those are refused, not read (docs/artifact.md).
# 3: a tenant's in_spec is the pytree spec of its call, (args tuple, kwargs dict); version 2
# recorded the args tuple alone and is still read (load.py wraps it as (args, {})).
FORMAT_VERSION = 3
OLDEST_READ = 2
MANIFEST = "manifest.json"
PLAN, WEIGHTS = "plan.json", "weights.safetensors"

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)}
