"""Offline evaluation (chronological split, protocol, baselines, rank metrics, fusion) and ``sitn train``'s warm start."""
