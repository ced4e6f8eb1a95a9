"""The MoRE op layer: reference, fast PyTorch path and Triton kernels behind one entry point."""

from smartfed_kernels.options import BACKENDS


def __getattr__(name):
    # The op loads on first use: `import smartfed_kernels.options` (configuration) must not pay
    # for importing torch.
    if name not in __all__:
        raise AttributeError(f"module 'smartfed_kernels' has no attribute {name!r}")
    from smartfed_kernels.dispatch import resolve_backend
    from smartfed_kernels.ops import more_linear

    globals().update({"more_linear": more_linear, "resolve_backend": resolve_backend})
    return globals()[name]


__all__ = ["BACKENDS", "more_linear", "resolve_backend"]
