"""Builds the optional CPU kernel library; the package works (slower) without it."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lightning_nf4.kernels._cpu_kernels",
            sources=["lightning_nf4/kernels/_cpu_kernels.c"],
            define_macros=[("LNF4_PYTHON_MODULE", "1")],
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
