"""`python -m lookout_edge.agent.rekognition`: the endpoint without the lookout-edge CLI."""

import argparse
import sys

from lookout_edge.agent.rekognition.cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m lookout_edge.agent.rekognition")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
