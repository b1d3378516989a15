"""munet: a continual multitask model server (command line, settings)."""
__version__ = "0.1.0"
