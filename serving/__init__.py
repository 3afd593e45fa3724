"""Serving: the FAISS item index, per-user state, the recommendation service and its HTTP API.

Nothing here imports PyTorch: a serving replica needs only numpy, FAISS and the wire schemas.
"""
