"""torchtitan glue: CPU support, config extension/validation, train spec, optimizers, metrics."""
