"""A thin adapter over the official ``kubernetes`` client (see ``client.py``)."""
