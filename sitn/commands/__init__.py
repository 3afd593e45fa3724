"""Subcommands of ``sitn``; each module exposes ``register(subparsers)``."""
