"""Triton kernels behind ``fastbert.ops``, installed as the package ``fastbert.kernels``.

One op per module, each holding its forward and backward kernels, host launchers, the torch reference and the
``torch.autograd.Function``. ``fastbert.ops`` decides when they run (CUDA tensors, or ``FASTBERT_BACKEND=triton``).
"""
