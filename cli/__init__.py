"""The `lookout-edge` command and `make demo`: the top layer, which may import every other."""
