"""The folder kernels/ installs as the subpackage fastkd.kernels: a top-level `kernels` would
shadow the Hugging Face package of that name, which transformers probes for. Every subpackage of
fastkd/ is found, so a new one cannot be left out of the wheel (tests/test_packaging.py)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["fastkd", "fastkd.*"]), "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    package_data={"fastkd": ["*.cpp"]},  # the CPU row ops' source, compiled at first use
)
