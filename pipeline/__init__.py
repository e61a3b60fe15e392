"""A two-stage feature-cache pipeline for image classification by transfer learning.

Stage one (`pipeline.extract`) runs a frozen torchvision CNN over a data set once
and caches its codes in HDF5; stage two (`pipeline.heads`) trains linear heads on
the cache in seconds; `pipeline.report` compares the runs. `python -m pipeline --help`.
"""
__version__ = "0.1.0"
