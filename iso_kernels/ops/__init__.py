"""Public ops. Each module holds, in flash-attention's order: the registered custom op
``iso_kernels::<op>`` with its fake, then the documented public function that states tensor shapes.
CUDA tensors run the Triton kernels of ``triton_ops``; CPU tensors run ``iso_kernels.reference``
(see ``iso_kernels._env`` for ``ISO_KERNELS_BACKEND``)."""
