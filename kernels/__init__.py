"""Triton kernels behind ``fastbert.ops``, installed as the package ``fastbert.kernels``.

One op per module (``attention``, ``residual_layer_norm``, ``bias_gelu``, ``mlm_loss``), each holding its forward
and backward kernels, host launchers, the torch reference and the ``torch.autograd.Function``; ``lamb`` is the
fused multi-tensor LAMB step (one launch per phase over every parameter, driven by a table of chunks and data
pointers, deterministic per-parameter norms for ZeRO fragments), called by ``fastbert.optim.Lamb``. ``downcast`` is
the float32-to-output rounding they share, and ``aot`` compiles every configuration the launchers can pick for GPUs
this machine may lack. ``fastbert.ops`` decides when they run (CUDA tensors, or ``FASTBERT_BACKEND=triton``).
"""
