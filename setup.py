"""Packaging glue: ship the top-level export/ recipes inside the wheel as `mobilemllm.export_recipes`."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mobilemllm", "mobilemllm.*"]) + ["mobilemllm.export_recipes"],
    package_dir={"mobilemllm.export_recipes": "export"},
)
