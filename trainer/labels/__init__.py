"""Rekognition Custom Labels: datasets, trainers and evaluation of image-level and object labels."""
