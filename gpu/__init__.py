"""The CUDA engine (installed as ``sortpool_ref.gpu``).

Importing this package imports nothing heavy: CuPy is imported and the CUDA
sources are compiled only when the engine is first used.
"""
