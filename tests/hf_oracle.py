"""Loading transformers and diffusers (the test-only oracles) from this repo.

This repo's kernels/ package (the MMFS kernels) shares its name with Hugging Face's `kernels` distribution, which
transformers (since 5.25) installs and imports as it loads whenever it is installed. Run from this repo, Python finds
our folder first and the import fails ("cannot import name 'CUDAProperties' from 'kernels'"). tests/conftest.py and
the bench/ scripts that compare against either library call hide_hub_kernels() first."""


def hide_hub_kernels():
    """Tell transformers (and diffusers, which loads it) that Hugging Face's `kernels` is not installed, so that it
    never imports our package in its place. Call before the first model class of either library is touched."""
    try:
        import transformers.utils as utils
        import transformers.utils.import_utils as import_utils
    except ImportError:  # no transformers: nothing would import Hugging Face's package
        return
    # both names: transformers' modules import the check from either, and it is cached (lru_cache) behind them
    utils.is_kernels_available = import_utils.is_kernels_available = lambda *args, **kwargs: False
