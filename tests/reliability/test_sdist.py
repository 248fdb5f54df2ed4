"""The source distribution carries everything the build reads.

At fdbb492 ``python -m build --sdist`` produced an archive without csrc/sources.txt, any header
or any .cu file, so ``pip install sophon_fast-0.1.0.tar.gz`` failed at metadata generation while
``pip install .`` from a checkout worked. This builds the sdist (about 5 s, no compilation) and
checks its file list; ``make sdist-check`` goes on to install it into a fresh environment.
"""

import tarfile

import pytest
from _sdist_check import ROOT, build_sdist, missing_members, required_members


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("setuptools")
    return build_sdist(tmp_path_factory.mktemp("sdist"))


def test_sdist_holds_every_file_the_build_reads(sdist):
    required = required_members(ROOT)
    assert "csrc/sources.txt" in required and "CMakeLists.txt" in required
    assert any(m.endswith(".cu") for m in required) and any(m.endswith(".h") for m in required)
    assert missing_members(sdist) == []


def test_every_listed_source_is_in_the_sdist(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    listed = [
        line.strip()
        for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert listed and [s for s in listed if s not in names] == []
