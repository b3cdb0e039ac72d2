"""transformers' own common model tests (``ModelTesterMixin``, ``ConfigTester``), importable here.

transformers' wheel has no tests; the sdist of the installed version has the top-level
``tests/*.py``, but not ``tests/generation/test_utils.py``, ``tests/exporters/test_export.py`` nor
``tests/utils/test_configuration_utils.py``, which ``test_modeling_common.py`` and
``test_configuration_common.py`` import. ``common_tests()`` builds, once per transformers version, a
package in the lmforge cache (``<cache>/transformers-tests/<version>-<hash of the stand-ins>/``)
with the two files straight out of the sdist and small stand-ins for the three missing modules
(``STAND_INS``), and imports it. The sdist comes from ``<cache>/downloads`` (``make setup`` puts it
there: ``python -m tests.transformers_common``), else pip downloads it from PyPI.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import pytest
import transformers

PACKAGE = "transformers_common_tests"
FILES = ("test_modeling_common.py", "test_configuration_common.py")

# The modules of transformers' tests/ that the sdist lacks, reduced to what the two files import.
STAND_INS = {
    # The generate tests (GenerationTesterMixin) are not run here: lmforge's own tests check
    # generate against transformers' models. Empty, so that importing test_modeling_common works.
    "generation/test_utils.py": '''\
class GenerationTesterMixin:
    """Stand-in: transformers' generation tests are not in its sdist."""
''',
    # Likewise the torch.export tests that ModelTesterMixin inherits from ExportTesterMixin.
    "exporters/test_export.py": '''\
class ExportTesterMixin:
    """Stand-in: transformers' export tests are not in its sdist."""
''',
    # ConfigTester.check_config_arguments_init sets each of these and reads it back. A stand-in of
    # transformers' dict: every argument of this transformers' PreTrainedConfig.__init__, each with a
    # value other than its default (as transformers asks of its own dict), plus output_attentions.
    "utils/test_configuration_utils.py": '''\
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
}


def cache_dir() -> Path:
    from lmforge.data import cache_dir as lmforge_cache

    return lmforge_cache()


def sdist(version: str = transformers.__version__) -> Path:
    """transformers' sdist of ``version`` in ``<cache>/downloads`` (pip downloads it once)."""
    from lmforge.data.fetch import download_sdist

    return download_sdist("transformers", version, cache_dir() / "downloads")


def build(version: str = transformers.__version__) -> Path:
    """The folder holding the package ``PACKAGE`` for ``version`` and these stand-ins (built on
    first use, atomically: the xdist workers collect this module at the same time)."""
    stand_ins = hashlib.sha256(repr(sorted(STAND_INS.items())).encode()).hexdigest()[:8]
    root = cache_dir() / "transformers-tests" / f"{version}-{stand_ins}"
    if (root / PACKAGE / "__init__.py").is_file():
        return root
    archive = sdist(version)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".build-") as tmp:
        package = Path(tmp) / root.name / PACKAGE
        package.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            for name in FILES:
                member = tar.extractfile(f"transformers-{version}/tests/{name}")
                (package / name).write_bytes(member.read())
        for name, source in STAND_INS.items():
            path = package / name
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(source)
        (package / "__init__.py").touch()  # written last: the mark of a complete package
        try:
            (Path(tmp) / root.name).rename(root)
        except OSError:  # built meanwhile by another process
            if not (root / PACKAGE / "__init__.py").is_file():
                raise
    return root


def common_tests():
    """(test_modeling_common, test_configuration_common) of the installed transformers."""
    root = str(build())
    if root not in sys.path:
        sys.path.insert(0, root)
    with warnings.catch_warnings():  # marks that transformers' own conftest.py registers
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
                importlib.import_module(f"{PACKAGE}.test_configuration_common"))


if __name__ == "__main__":  # make setup: fetch the sdist and build the package once
    print(build())
