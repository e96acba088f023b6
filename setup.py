"""What pyproject.toml cannot say: the wheel carries a compiled program.

``airlock-sandbox-init`` (native/airlock-sandbox-init.c) is built into the package by
``build_py``, so the wheel is platform-specific (``py3-none-linux_*``: it needs no Python ABI).
An editable install (``make install``) finds the one ``make`` built in the source tree.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

TARGET = os.path.join("airlock", "sandbox", "airlock-sandbox-init")


def _build_init(output: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "native_build", os.path.join(here, "native", "build.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(output)


class BuildPy(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            _build_init(os.path.join(self.build_lib, TARGET))

    def get_outputs(self, *args: Any, **kwargs: Any) -> list[str]:
        outputs: list[str] = super().get_outputs(*args, **kwargs)
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, TARGET))
        return outputs


class PlatformDistribution(Distribution):  # type: ignore[misc]
    def has_ext_modules(self) -> bool:
        return True  # a Linux executable inside: platform-specific (platlib, a platform tag)


class BdistWheel(bdist_wheel):  # type: ignore[misc]
    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


setup(cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel}, distclass=PlatformDistribution)
