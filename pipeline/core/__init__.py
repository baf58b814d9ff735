"""Shared building blocks: data types, errors, atomic writes, configs, run folders."""
