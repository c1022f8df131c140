"""How the SDXL VAE decode's cost depends on how many pictures one call decodes (CUDA only).

``python benchmarks/bench_decode.py [--out decode.json]``: the full-size SDXL VAE (random weights, fp16, dtype
asserted) decodes N latents of one size in chunks of 1, 2, 3, ... pictures; per chunking the milliseconds per
picture, the peak memory above the weights, and the GPU time of the decode's GroupNorm statistics (torch's
``RowwiseMoments`` kernel runs one block per (picture, group), so a lone picture keeps 32 blocks busy on a GPU of
132 multiprocessors). A table is printed last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.profiles import SDXL_VAE_CONFIG  # noqa: E402


def timed_decode(vae, latents: torch.Tensor, chunk: int, repeat: int = 3) -> tuple[float, float]:
    """Milliseconds per picture (median of ``repeat``) and peak GiB above what was allocated before."""
    def run():
        for i in range(0, len(latents), chunk):
            vae.decode(latents[i:i + chunk], return_dict=False)[0].float().cpu()
    run()  # warm-up of this shape
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(times)[len(times) // 2] * 1000 / len(latents), peak


def groupnorm_share(vae, latents: torch.Tensor, chunk: int) -> float:
    """GPU milliseconds per picture in GroupNorm kernels (statistics and normalisation)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(0, len(latents), chunk):
            vae.decode(latents[i:i + chunk], return_dict=False)
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if "group_norm" in e.key.lower()
                or "RowwiseMoments" in e.key or "ComputeFused" in e.key)
    return total / 1000 / len(latents)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("decode_results.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).to(torch.float16).eval()
    assert {p.dtype for p in vae.parameters()} == {torch.float16}
    rows = []
    with torch.no_grad():
        for side, count, chunks in ((800, 8, (1, 2, 4, 8)), (1024, 4, (1, 2, 4)), (768, 4, (1, 2, 4))):
            latents = torch.randn(count, 4, side // 8, side // 8, device="cuda", dtype=torch.float16)
            for chunk in chunks:
                ms, peak = timed_decode(vae, latents, chunk)
                rows.append(dict(side=side, pictures=count, chunk=chunk, ms_per_picture=round(ms, 1),
                                 peak_gib=round(peak, 2), groupnorm_ms_per_picture=round(
                                     groupnorm_share(vae, latents, chunk), 1)))
    info = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows)
    args.out.write_text(json.dumps(info, indent=1))
    print(f"{info['gpu']}, SDXL VAE decode, fp16")
    print(f"{'side':>5} {'pics':>4} {'chunk':>5} {'ms/pic':>8} {'groupnorm ms/pic':>17} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['side']:>5} {r['pictures']:>4} {r['chunk']:>5} {r['ms_per_picture']:>8.1f} "
              f"{r['groupnorm_ms_per_picture']:>17.1f} {r['peak_gib']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
