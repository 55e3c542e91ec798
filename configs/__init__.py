"""The gin configs tracer ships (installed as ``tracer.configs``): tiny, small, 1b."""
