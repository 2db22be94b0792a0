"""Root pytest configuration: the doctests of natgrad/ skip the framework integrations
whose framework is not installed (importing them raises an ImportError by design)."""

import importlib.util

collect_ignore = [
    path
    for path, module in (
        ("natgrad/integrations/huggingface.py", "transformers"),
        ("natgrad/integrations/lightning.py", "lightning"),
    )
    if importlib.util.find_spec(module) is None
]
