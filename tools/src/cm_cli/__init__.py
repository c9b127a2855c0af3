"""cm_cli: the ``cm`` command line of the consistency-models toolkit.

A thin skin over the libraries: each command parses its options, loads what it needs, calls
cm_train / cm_eval / cm_core / cm_nets, and prints one result. No mathematics lives here.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
