"""Serving: the exported S-head detector (jax.export) and its loader.

Importing this package imports nothing else of mimicdet_jax: the loader
(`serving.detector`) needs only jax, numpy and Pillow.
"""
