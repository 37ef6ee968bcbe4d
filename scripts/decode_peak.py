"""Peak memory of decoding full fine-tuning residual experts, per value: the figure
docs/file-format.md quotes. Builds ComPEFT (8 matrices 2048x2048, density 0.001) and ERE (8
matrices 512x512, 0.05 bits per value) residuals in float32 and float16, then, each in a fresh
process, the peak RSS of load_expert(path).state_dict() minus the RSS before it.

    python scripts/decode_peak.py WORK_DIR
"""
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import resource, sys, torch
torch.set_num_threads(1)
from lorahub_compeft import load_expert
expert = load_expert(sys.argv[1])
before = int(open("/proc/self/statm").read().split()[1]) * 4096
state = expert.state_dict()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(sum(t.numel() for t in state.values()), before, peak)
"""


def build(work: Path) -> None:
    import torch
    from lorahub_compeft import compress
    from lorahub_compeft.config import EreOptions
    from lorahub_compeft.io.adapters import Adapter
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = {"peft_type": "RESIDUAL", "base_model_name_or_path": "/nonexistent"}
    for dtype in (torch.float32, torch.float16):
        tensors = {f"layer{i}.weight": torch.randn(2048, 2048).to(dtype) for i in range(8)}
        tag = str(dtype).removeprefix("torch.")
        compress(Adapter(tensors, config, {"path": "/x"}), density=0.001).save(
            work / f"compeft-{tag}.safetensors", force=True)
        small = {k: t[:512, :512].clone() for k, t in tensors.items()}
        compress(Adapter(small, config, {"path": "/x"}), EreOptions(budget_bits=0.05)).save(
            work / f"ere-{tag}.safetensors", force=True)


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    build(work)
    for path in sorted(work.glob("*.safetensors")):
        numel, before, peak = map(int, subprocess.run([sys.executable, "-c", CHILD, str(path)],
                                                      capture_output=True, text=True, check=True).stdout.split())
        print(f"{path.name}: {path.stat().st_size} bytes, {numel} values, "
              f"{(peak - before) / numel:.2f} bytes per value at the peak")


if __name__ == "__main__":
    main()
