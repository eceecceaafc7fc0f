"""Greengrass components: recipe templates rendered, model components packaged, recipes checked."""
