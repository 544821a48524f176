"""Built-in policies; importing this package registers each (``freeze``, ``full``, ``lora``, ``prefix``)."""

from layerfreeze.policies import freeze, full, lora, prefix  # noqa: F401  (registration side effect)
