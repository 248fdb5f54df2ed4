"""The kernel layer needs only torch (and optionally triton): a bare GPU machine without network
may lack the user-facing dependencies (tqdm, safetensors, matplotlib)."""

import subprocess
import sys
import textwrap

BLOCKED = ("tqdm", "safetensors", "matplotlib")


def test_import_and_ops_without_user_facing_dependencies():
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ModuleNotFoundError(name + " is blocked for this test")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import sophon_fast
        assert "reference" in sophon_fast.available_backends()
        out = sophon_fast.flat_sgd_step(torch.ones(3), torch.ones(3), 0.5)
        assert torch.equal(out, torch.full((3,), 0.5))
        assert not any(m.split(".")[0] in {BLOCKED!r} for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
