"""Tests of the Rekognition Custom Labels datasets, trainers and evaluation."""
