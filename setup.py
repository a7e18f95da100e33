"""The folder kernels/ installs as the subpackage fastkd.kernels: a top-level `kernels` would
shadow the Hugging Face package of that name, which transformers probes for."""

from setuptools import setup

setup(
    packages=["fastkd", "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
)
