"""Load tests of the chat server on real services (``python -m bench.load``)."""
