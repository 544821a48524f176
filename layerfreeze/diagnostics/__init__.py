"""Layer diagnostics: angular distances between layer inputs, tracing, pruning and hybrid models.

Engine-neutral: every measure finds the decoder blocks through
:func:`layerfreeze.models.discover_layout`, like the policies do.
"""
