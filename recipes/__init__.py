"""Greengrass recipe templates (YAML), shipped with the package so that `lookout-edge package`
works from an installed lookout-edge as well as from a source checkout."""
