"""Benchmarks against plain diffusers: ``imageprompt bench`` (:mod:`.main`); one module per row group."""
