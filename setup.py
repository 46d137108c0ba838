# Metadata lives in pyproject.toml. This file is kept for tools that still call `python setup.py`, and is
# where the optional C++/CUDA extension from csrc/ will be added (opt-in, never required to import).
from setuptools import setup

setup()
